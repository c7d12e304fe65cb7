"""The few places where gradio 3.41 (A1111), 4.x (Forge) and 5.x (the standalone app) differ.

Everything else in the UI is written against what the three lines share; these helpers
pass an argument only where the running gradio accepts it. Where this file says "4.x",
5.x behaves the same (gr.Timer, `js`, default_concurrency_limit, strict Dropdown values).
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def _accepted(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def make(cls: type, **kwargs: Any):
    """A component with only the keyword arguments this gradio knows (3.x warns on others, 4.x raises)."""
    return cls(**_accepted(cls.__init__, kwargs))


def on(event: Callable, fn: Callable, inputs: list | None, outputs: list | None, api_name: str, **extra: Any):
    """Wire an event (button.click, dropdown.change, ...); 4.x-only arguments are dropped on 3.x.

    Every event gets an api_name: 4.x names unnamed events itself, 3.x leaves them None.
    """
    return event(fn, inputs=inputs or [], outputs=outputs or [], **_accepted(event, {"api_name": api_name, **extra}))


def every(blocks: gr.Blocks, seconds: float, fn: Callable, inputs: list | None, outputs: list, api_name: str,
          carry: int | None = None) -> None:
    """Call `fn` every `seconds` while the page is open: gr.Timer on 4.x, a polling load on 3.x.

    With `carry`, inputs[carry] is a gr.State that `fn` also returns last: what this page has
    been shown. 4.x hands each tick the State's latest value; 3.x calls a polling load with the
    inputs of its first call forever, so there the loop passes the returned value on itself.
    """
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        on(timer.tick, fn, inputs, outputs, api_name, show_progress="hidden")
        return
    target = fn
    if carry is not None:
        def target(*args):  # a generator that never ends: gradio's own loop never calls it again
            args = list(args)
            while True:
                out = fn(*args)
                yield out
                args[carry] = out[-1]
                time.sleep(seconds)
    blocks.load(target, inputs=inputs or None, outputs=outputs, every=seconds, api_name=api_name,
                show_progress="hidden")


def enable_queue(blocks: gr.Blocks, workers: int = 4) -> gr.Blocks:
    """The queue that polling and generators need, sized the way each gradio line spells it."""
    if GRADIO_MAJOR >= 4:
        return blocks.queue(default_concurrency_limit=workers)
    return blocks.queue(concurrency_count=workers)


def image_input(label: str, elem_id: str):
    """An image upload that hands the handler a file path."""
    return make(gr.Image, label=label, type="filepath", elem_id=elem_id, height=220,
                sources=["upload", "clipboard"], source="upload")


def image_output(label: str, elem_id: str):
    """An image the app shows (a preview), whole rather than cropped."""
    return make(gr.Image, label=label, type="pil", interactive=False, elem_id=elem_id, height=260,
                show_download_button=True)


def then_js(dependency: Any, js: str, inputs: list) -> None:
    """Run the browser function `js` on `inputs` once the event's own outputs are shown."""
    key = "js" if GRADIO_MAJOR >= 4 else "_js"
    dependency.then(None, inputs=inputs, outputs=None, **{key: js})


def run_js_on_load(blocks: gr.Blocks, js: str) -> None:
    """Run `js` (the body of javascript/*.js) once the page has loaded (3.x `_js`, 4.x `js`)."""
    code = f"() => {{\n{js}\n}}"
    key = "js" if GRADIO_MAJOR >= 4 else "_js"
    blocks.load(None, inputs=None, outputs=None, **{key: code})
