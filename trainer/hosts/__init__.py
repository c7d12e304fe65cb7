"""Host adapters. `webui` is the only code that imports the WebUI's `modules`."""
