"""The Gradio UI (the only part of trainer/ that imports gradio).

`trainer.ui.form` and `trainer.ui.controller` hold the logic without gradio;
`trainer.ui.app.build_ui(controller)` builds the tabs; `python -m trainer.ui` runs
the standalone app.
"""
