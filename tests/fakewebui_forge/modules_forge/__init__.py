"""Forge's marker package (tests only)."""
