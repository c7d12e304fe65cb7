"""The Train tab's form as data: widget values by field name <-> TrainConfig.

No gradio here, so the conversions are tested in every profile. Widgets hold what a
preset file holds (numbers as text, "" for "use the default"), and every value goes
back through the schema's own coercion, so a bad entry is refused with the field's
preset key and the value, exactly as from a preset or the CLI.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config.schema import SECOND_PASS_FIELDS, SECOND_PASS_KEY, TrainConfig
from ..config.params import GROUPS, ConfigError, Param, coerce, shown

FORM_FIELDS: tuple[str, ...] = tuple(name for name, _ in TrainConfig.params())
PARAMS: dict[str, Param] = dict(TrainConfig.params())
IMAGE_FIELDS = ("diff_original_image", "diff_target_image")
PROMPT_FIELDS = ("original_prompt", "target_prompt", "negative_prompt")
HEADER_FIELDS = ("mode", "model", "vae")  # the row above the groups
SPECIAL = frozenset(HEADER_FIELDS + IMAGE_FIELDS + PROMPT_FIELDS)
SECOND_PREFIX = f"{SECOND_PASS_KEY}."  # how a 2nd-pass field's error names it (as the CLI's --set does)
SECOND_LABEL = "2nd pass: "
REQUIRED = tuple(n for n in FORM_FIELDS if PARAMS[n].section == "required" and n not in SPECIAL)
# The folded groups of optional settings, in the schema's order, each with its fields in schema order.
GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    key: tuple(n for n in FORM_FIELDS if PARAMS[n].group == key and n not in SPECIAL) for key, _ in GROUPS}
GROUP_TITLES = dict(GROUPS)


def widget_value(p: Param, value: Any) -> Any:
    """What the widget of `p` shows for `value` (numbers as text, like a preset)."""
    if p.kind in ("int", "float"):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if p.kind == "optfloat":
        return "" if value is None else f"{value:g}"
    if p.kind == "size":
        h, w = value
        return str(h) if h == w else f"{h},{w}"
    if p.kind == "blocks":
        return list(value)
    return value


def form_values(cfg: TrainConfig) -> dict[str, Any]:
    return {name: widget_value(PARAMS[name], getattr(cfg, name)) for name in FORM_FIELDS}


def second_values(cfg: TrainConfig) -> dict[str, Any]:
    """The 2nd-pass panel: the preset's "2nd pass" values where it has them, else pass 1's."""
    second = cfg.with_overrides(cfg.second_pass) if cfg.second_pass else cfg
    return {name: widget_value(PARAMS[name], getattr(second, name)) for name in SECOND_PASS_FIELDS}


def _clean(value: Any) -> Any:
    return "" if value is None else value


def config_from(values: Mapping[str, Any], second: Mapping[str, Any] | None = None,
                fallbacks: Mapping[str, str] | None = None) -> TrainConfig:
    """A config from form values; empty fields in `fallbacks` take its value (e.g. the demo's data)."""
    data = {name: _clean(values[name]) for name in FORM_FIELDS if name in values}
    for name, value in (fallbacks or {}).items():
        if not str(data.get(name, "")).strip():
            data[name] = value
    cfg = TrainConfig.from_dict({PARAMS[name].key: value for name, value in data.items()})
    if second and cfg.mode == "Difference":
        pass2 = {PARAMS[name].key: _clean(value) for name, value in second.items() if name in SECOND_PASS_FIELDS}
        try:
            cfg = cfg.with_overrides({SECOND_PASS_KEY: pass2})
        except ConfigError as exc:  # the same key exists in pass 1: say which panel it came from
            raise ConfigError(f"{SECOND_PREFIX}{exc.key}", exc.value, exc.problem) from None
    return cfg


@dataclass(frozen=True)
class FieldError:
    """A refused value as the Train tab shows it: beside the field, under its on-screen label."""

    name: str       # the schema's field name
    second: bool    # in the 2nd-pass panel
    label: str      # the label on screen ("2nd pass: " in front for the 2nd-pass panel)
    elem_id: str    # the widget's elem_id
    group: str      # the folded group that holds it ("" when it is not in one)
    text: str       # "<label>: <problem> (got <value>)"

    def payload(self) -> dict[str, str]:
        return {"id": self.elem_id, "label": self.label, "text": self.text}


def field_of(key: str) -> tuple[str, bool] | None:
    """(field name, in the 2nd-pass panel) for an error's key, or None when no field has it."""
    second = key.startswith(SECOND_PREFIX)
    key = key[len(SECOND_PREFIX):] if second else key
    try:
        name = TrainConfig.param_for(key)[0]
    except KeyError:
        return None
    if name not in PARAMS or (second and name not in SECOND_PASS_FIELDS):
        return None
    return name, second


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\([^)]*\))?")


def with_labels(text: str) -> str:
    """Preset keys inside a message replaced by their on-screen labels ("needs noise_offset" ->
    "needs 'Noise offset'"). Only keys with an underscore or brackets: plain words stay words."""
    def label(match: re.Match) -> str:
        word = match.group(0)
        found = field_of(word) if ("_" in word or "(" in word) else None
        return f"'{PARAMS[found[0]].label}'" if found else word
    return _WORD.sub(label, text)


def explain(exc: ConfigError) -> FieldError | None:
    """Where and how the Train tab shows `exc`; None when it names no field of the form."""
    found = field_of(str(exc.key))
    if found is None:
        return None
    name, second = found
    label = (SECOND_LABEL if second else "") + PARAMS[name].label
    prefix = "2nd-" if second else ""
    group = "second" if second else PARAMS[name].group
    text = f"{label}: {with_labels(exc.problem)} (got {shown(exc.value)})"
    return FieldError(name, second, label, f"traindeck-{prefix}{name}".replace("_", "-"), group, text)


def error_text(exc: Exception) -> str:
    """The Message box's line for a refused input: the field's label when it has one."""
    found = explain(exc) if isinstance(exc, ConfigError) else None
    return f"error: {found.text if found else exc}"


def persist_upload(path: str | None, folder: Path, field: str) -> str:
    """A stable copy of an uploaded image (gradio's temp files do not outlive the session).

    Queued jobs keep the copy's path, so they still run after a restart. The copy is
    named by content hash, so the same image is stored once.
    """
    if not path:
        return ""
    src = Path(path)
    if not src.is_file():
        raise ConfigError(field, path, "the uploaded image is gone; upload it again")
    folder = folder.resolve()
    if src.resolve().parent == folder:
        return str(src.resolve())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:20]
    dest = folder / f"{digest}{src.suffix.lower() or '.png'}"
    if not dest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return str(dest)


# The fields only some model families use (the schema's `families`), e.g. FLUX's flow options.
FAMILY_FIELDS: tuple[str, ...] = tuple(n for n in FORM_FIELDS if PARAMS[n].families)
# Their files (FLUX's CLIP-L, T5-XXL, autoencoder): pickers of the host's files, like the VAE.
PART_FIELDS: tuple[str, ...] = tuple(n for n in FAMILY_FIELDS if PARAMS[n].kind == "path")


def _changed(p: Param, value: Any, default: Any) -> bool:
    """Whether a widget value differs from the field's default (an entry that does not parse counts)."""
    try:
        return coerce(p, _clean(value), default) != default
    except ConfigError:
        return True


def families_in_use(values: Mapping[str, Any] | None) -> set[str]:
    """The families whose own fields hold a value other than their default (e.g. a FLUX preset)."""
    defaults = TrainConfig()
    used: set[str] = set()
    for name in FAMILY_FIELDS:
        p = PARAMS[name]
        if values and name in values and _changed(p, values[name], getattr(defaults, name)):
            used.update(p.families)
    return used


def visible_fields(mode: str, family: str | None = None, values: Mapping[str, Any] | None = None) -> set[str]:
    """The fields shown for `mode` and the chosen model's `family` (the schema's `modes` and `families`).

    A field of some families only is shown for a model of one of them. When the family cannot
    be told (None: no model chosen, a file whose header says nothing), it is shown only while a
    field of that family holds a value other than its default in `values`, so a FLUX preset
    shows its settings, and an SD user never meets them.
    """
    in_use = families_in_use(values) if family is None else set()

    def applies(p: Param) -> bool:
        return not p.families or family in p.families or bool(in_use & set(p.families))
    return {name for name, p in PARAMS.items() if mode in p.modes and applies(p)}
