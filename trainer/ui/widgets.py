"""Widgets generated from the schema: one per setting, by its kind, label, help and choices."""
from __future__ import annotations

from typing import Any

import gradio as gr

from ..config.schema import BLOCK_IDS
from ..config.params import Param
from .compat import make


def component(name: str, p: Param, value: Any, *, prefix: str = "", visible: bool = True, label_prefix: str = "",
              files: list[str] | None = None):
    """The widget for one setting; elem_id is 'traindeck-<prefix><name>' (browser tests find it).

    With `files`, a path setting is a picker of those files that also takes a typed path."""
    elem_id = f"traindeck-{prefix}{name}".replace("_", "-")
    common = dict(label=f"{label_prefix}{p.label}", info=p.help, visible=visible, elem_id=elem_id)
    if files is not None and p.kind == "path":
        return make(gr.Dropdown, choices=["", *files], value=value, allow_custom_value=True, **common)
    if p.kind == "bool":
        return make(gr.Checkbox, value=bool(value), **common)
    if p.kind == "choice":
        return make(gr.Dropdown, choices=list(p.choices), value=value, **common)
    if p.kind == "blocks":
        return make(gr.CheckboxGroup, choices=list(BLOCK_IDS), value=list(value), **common)
    if p.kind == "text":
        return make(gr.Textbox, value=value, lines=2, max_lines=8, **common)
    return make(gr.Textbox, value=value, lines=1, max_lines=1, **common)


def build(names: list[str] | tuple[str, ...], params: dict[str, Param], values: dict[str, Any], *,
          prefix: str = "", visible: set[str] | None = None, label_prefix: str = "",
          files: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Widgets for `names` in order, laid out two to a row; returns {name: component}.
    `files` gives the path settings that are file pickers their choices."""
    out: dict[str, Any] = {}
    for start in range(0, len(names), 2):
        with gr.Row():
            for name in names[start:start + 2]:
                shown = visible is None or name in visible
                out[name] = component(name, params[name], values[name], prefix=prefix, visible=shown,
                                      label_prefix=label_prefix, files=(files or {}).get(name))
    return out
