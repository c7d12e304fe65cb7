"""on_ui_tabs / on_app_started registries."""
ui_tabs_callbacks = []
app_started_callbacks = []


def on_ui_tabs(callback, *, name=None):
    ui_tabs_callbacks.append(callback)


def on_app_started(callback, *, name=None):
    app_started_callbacks.append(callback)
