"""The Train tab: mode, model, presets, every setting from the schema, and the job buttons."""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

import gradio as gr

from ..config.schema import MODES, SECOND_PASS_FIELDS, TrainConfig
from ..config.params import ConfigError
from . import form, widgets
from .compat import image_input, image_output, make, on, then_js
from .controller import Controller

log = logging.getLogger(__name__)
ERRORS = (ConfigError, FileExistsError, OSError, ValueError)
# A preset that leaves these empty keeps what the user chose or uploaded (they are the user's data).
KEPT_WHEN_EMPTY = ("model", "vae", "lora_data_directory", *form.IMAGE_FIELDS)
# The preview buttons appear in the modes whose prompt they render (the schema's modes).
PREVIEW = {"original": "original_prompt", "target": "target_prompt"}
SHOW_FIELD_ERROR = "(e) => { window.traindeckFieldError && window.traindeckFieldError(e); return []; }"


def guarded(fn: Callable[..., Any], n_outputs: int) -> Callable[..., Any]:
    """Run a handler; a refused input becomes the message (last output), other outputs unchanged."""
    def run(*args):
        try:
            return fn(*args)
        except ERRORS as exc:
            log.info("refused: %s", exc)
            skip = [gr.update()] * (n_outputs - 1)
            return (*skip, form.error_text(exc)) if n_outputs > 1 else form.error_text(exc)
    return run


class TrainTab:
    def __init__(self, ctl: Controller, initial: TrainConfig):
        self.ctl = ctl
        values = form.form_values(initial)
        shown = form.visible_fields(initial.mode, ctl.model_family(initial.model), values)
        p = form.PARAMS
        with gr.Row():
            self.mode = make(gr.Radio, choices=list(MODES), value=initial.mode, label="Mode", elem_id="traindeck-mode")
        with gr.Row():
            self.model = make(gr.Dropdown, choices=ctl.host.list_models(), value=values["model"] or None,
                              label=p["model"].label, info=p["model"].help, allow_custom_value=True,
                              elem_id="traindeck-model", scale=4)
            self.vae = make(gr.Dropdown, choices=["", *ctl.host.list_vaes()], value=values["vae"],
                            label=p["vae"].label, allow_custom_value=True, elem_id="traindeck-vae", scale=2)
            self.refresh_models = make(gr.Button, value="Refresh models", elem_id="traindeck-refresh-models", scale=1)
        self._preset_row()
        with gr.Group():
            self.fields = widgets.build(form.REQUIRED, p, values, visible=shown)
        self._prompts(values, shown, initial.mode)
        with make(gr.Row, visible=bool(shown & set(form.IMAGE_FIELDS))) as self.image_row:
            for name in form.IMAGE_FIELDS:
                self.fields[name] = image_input(p[name].label, f"traindeck-{name}".replace("_", "-"))
        self._groups(values, shown, initial)
        self.fields.update(mode=self.mode, model=self.model, vae=self.vae)
        self._buttons()

    def _prompts(self, values: dict, shown: set[str], mode: str) -> None:
        """The prompts, and a preview button with its own image box for each prompt of the mode."""
        with make(gr.Group, visible=bool(shown & set(form.PROMPT_FIELDS))) as self.prompt_group:
            self.fields.update(widgets.build(list(form.PROMPT_FIELDS), form.PARAMS, values, visible=shown))
            self.preview_cols, self.preview_buttons, self.preview_images = {}, {}, {}
            with gr.Row():
                for which, prompt in PREVIEW.items():
                    with make(gr.Column, visible=mode in form.PARAMS[prompt].modes) as self.preview_cols[which]:
                        self.preview_buttons[which] = make(gr.Button, value=f"Generate {which}",
                                                           elem_id=f"traindeck-preview-{which}")
                        self.preview_images[which] = image_output(f"{which.capitalize()} (base model)",
                                                                  f"traindeck-preview-{which}-image")

    def _groups(self, values: dict, shown: set[str], initial: TrainConfig) -> None:
        """The optional settings, folded by the schema's groups; then Difference's 2nd pass."""
        make(gr.Markdown, value="**Optional settings**", elem_id="traindeck-optional")
        files = self.ctl.part_files()
        parts = {name: files for name in form.PART_FIELDS}
        self.groups: dict[str, Any] = {}
        for key, names in form.GROUP_FIELDS.items():
            with make(gr.Accordion, label=form.GROUP_TITLES[key], open=False, visible=bool(shown & set(names)),
                      elem_id=f"traindeck-group-{key}") as self.groups[key]:
                self.fields.update(widgets.build(names, form.PARAMS, values, visible=shown, files=parts))
        with make(gr.Accordion, label="2nd pass (Difference)", open=False, visible=initial.mode == "Difference",
                  elem_id="traindeck-group-second") as self.second_box:
            self.copy_first = make(gr.Button, value="Copy settings from 1st pass", elem_id="traindeck-copy-first")
            self.second = widgets.build(list(SECOND_PASS_FIELDS), form.PARAMS, form.second_values(initial),
                                        prefix="2nd-", label_prefix=form.SECOND_LABEL)
        self.groups["second"] = self.second_box

    def _preset_row(self) -> None:
        with gr.Row():
            self.preset = make(gr.Dropdown, choices=self.ctl.presets(), value=None, label="Preset",
                               elem_id="traindeck-preset", allow_custom_value=True, scale=3)
            self.load_preset_btn = make(gr.Button, value="Load preset", elem_id="traindeck-load-preset", scale=1)
            self.save_preset_btn = make(gr.Button, value="Save preset", elem_id="traindeck-save-preset", scale=1)
            self.refresh_presets = make(gr.Button, value="Refresh", elem_id="traindeck-refresh-presets", scale=1)
            self.settings = make(gr.Dropdown, choices=self.ctl.settings_files(), value=None, label="Settings JSON",
                                 allow_custom_value=True, elem_id="traindeck-settings", scale=3)
            self.load_settings_btn = make(gr.Button, value="Load JSON", elem_id="traindeck-load-settings", scale=1)

    def _buttons(self) -> None:
        with gr.Row():
            self.start = make(gr.Button, value="Start Training", variant="primary", elem_id="traindeck-start")
            self.stop = make(gr.Button, value="Stop", elem_id="traindeck-stop")
            self.stop_save = make(gr.Button, value="Stop and Save", elem_id="traindeck-stop-save")
            self.enqueue = make(gr.Button, value="Add to Queue", elem_id="traindeck-add")
        self.message = make(gr.Textbox, label="Message", interactive=False, elem_id="traindeck-message")
        # Where the refused field is, for javascript/traindeck.js (it marks the field and shows the text).
        self.field_error = make(gr.Textbox, value="", visible=False, elem_id="traindeck-field-error")
        self.status = make(gr.Textbox, label="Status", interactive=False, value=self.ctl.status(),
                           elem_id="traindeck-status")
        self.gallery = make(gr.Gallery, label="Samples", columns=4, height=260, elem_id="traindeck-samples")
        self.grid = make(gr.Image, label="Evaluation grid", type="filepath", interactive=False,
                         value=self.ctl.grid(), elem_id="traindeck-grid")

    # ---- values <-> widgets -------------------------------------------------------------
    @property
    def inputs(self) -> list:
        return [self.fields[n] for n in form.FORM_FIELDS] + [self.second[n] for n in SECOND_PASS_FIELDS]

    @property
    def outputs(self) -> list:
        return self.inputs

    def read(self, args: tuple) -> TrainConfig:
        n = len(form.FORM_FIELDS)
        values = dict(zip(form.FORM_FIELDS, args[:n]))
        second = dict(zip(SECOND_PASS_FIELDS, args[n:n + len(SECOND_PASS_FIELDS)]))
        return self.ctl.config(values, second)

    def show(self, cfg: TrainConfig) -> list:
        """Updates that put `cfg` into every widget; what it leaves empty of KEPT_WHEN_EMPTY stays."""
        values, second = form.form_values(cfg), form.second_values(cfg)
        out = []
        for name in form.FORM_FIELDS:
            value = values[name]
            out.append(gr.update() if name in KEPT_WHEN_EMPTY and not value else gr.update(value=value))
        return out + [gr.update(value=second[n]) for n in SECOND_PASS_FIELDS]

    # ---- events ---------------------------------------------------------------------------
    @property
    def view_inputs(self) -> list:
        """What decides which fields show: the mode, the model (its family) and the family-only fields."""
        return [self.mode, self.model, *(self.fields[n] for n in form.FAMILY_FIELDS)]

    @property
    def view_outputs(self) -> list:
        fields = [self.fields[n] for n in form.FORM_FIELDS if n not in form.HEADER_FIELDS]
        return fields + [self.prompt_group, self.image_row, *self.preview_cols.values(), *self.groups.values()]

    def on_view(self, mode: str, model: str | None, *family_values) -> list:
        """Show the fields of `mode` and of the model's family (a group shows while a field in it does)."""
        family = self.ctl.model_family(model)
        shown = form.visible_fields(mode, family, dict(zip(form.FAMILY_FIELDS, family_values)))
        ups = [gr.update(visible=n in shown) for n in form.FORM_FIELDS if n not in form.HEADER_FIELDS]
        ups += [gr.update(visible=bool(shown & set(form.PROMPT_FIELDS))),
                gr.update(visible=bool(shown & set(form.IMAGE_FIELDS)))]
        ups += [gr.update(visible=mode in form.PARAMS[prompt].modes) for prompt in PREVIEW.values()]
        ups += [gr.update(visible=bool(shown & set(names))) for names in form.GROUP_FIELDS.values()]
        return ups + [gr.update(visible=mode == "Difference")]

    def submit(self, start: bool) -> Callable[..., list]:
        """Start or Add: the job is checked whole; a refusal is shown beside its field, group opened."""
        def run(*args) -> list:
            try:
                cfg = self.read(args)
                text = self.ctl.start(cfg) if start else self.ctl.add(cfg)
            except ERRORS as exc:
                log.info("refused: %s", exc)
                where = form.explain(exc) if isinstance(exc, ConfigError) else None
                opened = [gr.update(open=True) if where and where.group == key else gr.update()
                          for key in self.groups]
                return [form.error_text(exc), json.dumps(where.payload()) if where else "", *opened]
            return [text, "", *[gr.update() for _ in self.groups]]
        return run

    def on_load_preset(self, name: str) -> list:
        cfg, warnings = self.ctl.load_preset(name)
        note = f"loaded preset {name}" + (f" ({'; '.join(warnings)})" if warnings else "")
        return [*self.show(cfg), note]

    def on_load_settings(self, name: str) -> list:
        return [*self.show(self.ctl.load_settings(name)), f"loaded settings {name}"]

    def on_save_preset(self, name: str, *args) -> list:
        cfg = form.config_from(dict(zip(form.FORM_FIELDS, args)), dict(zip(SECOND_PASS_FIELDS, args[len(form.FORM_FIELDS):])))
        path = self.ctl.save_preset((name or "").strip(), cfg)
        return [gr.update(choices=self.ctl.presets(), value=path.stem), f"saved preset {path}"]

    def on_refresh(self) -> list:
        return [gr.update(choices=self.ctl.presets()), gr.update(choices=self.ctl.settings_files())]

    def on_refresh_models(self) -> list:
        parts = [gr.update(choices=["", *self.ctl.part_files()]) for _ in form.PART_FIELDS]
        return [gr.update(choices=self.ctl.host.list_models()), gr.update(choices=["", *self.ctl.host.list_vaes()]),
                *parts]

    def on_copy_first(self, *values) -> list:
        return [gr.update(value=v) for v in values]

    def on_preview(self, which: str) -> Callable[..., Iterator[list]]:
        """Generate original/target: busy at once (button off, message), then the image in its own box."""
        idle = gr.update(value=f"Generate {which}", interactive=True)

        def run(*args) -> Iterator[list]:
            yield [gr.update(value="Generating…", interactive=False), gr.update(),
                   f"generating the {which} preview: loading the base model, then sampling (this can take a minute)"]
            try:
                cfg = form.config_from(dict(zip(form.FORM_FIELDS, args)), None, self.ctl.fallbacks)
                images = self.ctl.preview(cfg, which)
            except ERRORS as exc:
                log.info("preview refused: %s", exc)
                yield [idle, gr.update(), form.error_text(exc)]
                return
            yield [idle, images[0], f"generated the {which} prompt with the base model"]
        return run

    def wire(self) -> None:
        msg, n_form = self.message, len(self.outputs) + 1
        view = (self.on_view, self.view_inputs, self.view_outputs)
        on(self.mode.change, *view, "traindeck_mode")
        on(self.model.change, *view, "traindeck_model")
        job_outputs = [msg, self.field_error, *self.groups.values()]
        for button, start, api in ((self.start, True, "traindeck_start"), (self.enqueue, False, "traindeck_add")):
            then_js(on(button.click, self.submit(start), self.inputs, job_outputs, api), SHOW_FIELD_ERROR,
                    [self.field_error])
        on(self.stop.click, lambda: self.ctl.stop(False), None, [msg], "traindeck_stop")
        on(self.stop_save.click, lambda: self.ctl.stop(True), None, [msg], "traindeck_stop_save")
        loaded = on(self.load_preset_btn.click, guarded(self.on_load_preset, n_form), [self.preset],
                    [*self.outputs, msg], "traindeck_load_preset")
        on(loaded.then, *view, "traindeck_preset_view")  # a FLUX preset shows FLUX's fields
        loaded = on(self.load_settings_btn.click, guarded(self.on_load_settings, n_form), [self.settings],
                    [*self.outputs, msg], "traindeck_load_settings")
        on(loaded.then, *view, "traindeck_settings_view")
        on(self.save_preset_btn.click, guarded(self.on_save_preset, 2), [self.preset, *self.inputs],
           [self.preset, msg], "traindeck_save_preset")
        on(self.refresh_presets.click, self.on_refresh, None, [self.preset, self.settings], "traindeck_refresh_presets")
        refreshed = on(self.refresh_models.click, self.on_refresh_models, None,
                       [self.model, self.vae, *(self.fields[n] for n in form.PART_FIELDS)], "traindeck_refresh_models")
        on(refreshed.then, *view, "traindeck_refresh_view")  # the WebUI may hold another model by now
        first = [self.fields[n] for n in SECOND_PASS_FIELDS]
        on(self.copy_first.click, self.on_copy_first, first, [self.second[n] for n in SECOND_PASS_FIELDS],
           "traindeck_copy_first")
        for which, button in self.preview_buttons.items():
            on(button.click, self.on_preview(which), self.inputs[:len(form.FORM_FIELDS)],
               [button, self.preview_images[which], msg], f"traindeck_preview_{which}")
