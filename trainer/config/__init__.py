"""The one parameter schema, presets and the options by topic."""
