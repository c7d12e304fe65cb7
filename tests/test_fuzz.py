"""Fuzzing the preset loader, the schema's coercion and the free-text settings parsers.

Whatever arrives (a preset file's bytes, an API's JSON object, a ``k=v`` text box),
the only exception that may escape is ``trainer.config.params.ConfigError``, and it names the
field it was given. Hypothesis runs derandomized (the same examples on every run, no
example database), and each test is bounded by ``max_examples`` and a timeout.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from diffusers.optimization import get_piecewise_constant_schedule
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainer.config.schema import IGNORED_KEYS, SECOND_PASS_FIELDS, SECOND_PASS_KEY, TrainConfig
from trainer.config.kvparse import parse_settings, parse_step_rules
from trainer.config.params import ConfigError
from trainer.config.presets import load_preset

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

PARAMS = dict(TrainConfig.params())
PRESET_KEYS = sorted({p.key for p in PARAMS.values()} | set(PARAMS))
TEXT_FIELDS = ("train_optimizer_settings", "train_lr_scheduler_settings", "train_lr_step_rules", "other field")
TRICKY = ["", " ", "\t\n", "\x00", "a\x00b", "nan", "NaN", "-nan", "inf", "-Infinity", "1e400", "-1e400", "9" * 500,
          "0x10", "1_000", "512", "512,768", "512x768", "8", "0", "-1", "1e-7", "true", "False", "yes", "None", "none",
          "AdamW", "lierla", "LoCon", "cosine", "bf16", "Difference", "BASE,IN01", "../x", "/etc", "CON", "\ud800",
          "weight_decay=0.1", "1:10,0.1", "é", "\r\n"]


def _text(max_size: int = 24) -> st.SearchStrategy[str]:
    """Any text, with the tricky pieces (NUL, NaN, huge numbers, lone surrogates) mixed in."""
    piece = st.sampled_from(TRICKY) | st.text(max_size=8)
    return st.lists(piece, max_size=4).map("".join) | st.text(max_size=max_size)


# Huge ints are built, not sampled: hypothesis cannot repr an int of over 4300 digits in a strategy.
HUGE = st.sampled_from([63, 400, -400, 5000]).map(lambda n: 10**n if n > 0 else -(10**-n))
SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=True, allow_infinity=True) | _text()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(_text(8), inner, max_size=4), max_leaves=12)
KEYS = st.sampled_from(PRESET_KEYS + sorted(IGNORED_KEYS)) | _text(12)
SETTINGS = st.dictionaries(KEYS, VALUES, max_size=8)
SECOND = st.none() | VALUES | st.dictionaries(st.sampled_from(SECOND_PASS_FIELDS) | KEYS, VALUES, max_size=5)
PRESETS = st.builds(lambda d, second: {**d, SECOND_PASS_KEY: second} if second is not None else d, SETTINGS, SECOND)


def _named(data: Any) -> set[str]:
    """Every field an error about `data` may name: its known keys, nested ones, and the containers."""
    names = {"preset", SECOND_PASS_KEY}
    if not isinstance(data, dict):
        return names
    nested = data.get(SECOND_PASS_KEY)
    for key in [*data, *(nested if isinstance(nested, dict) else ())]:
        try:
            names.add(TrainConfig.param_for(key)[1].key)
        except (KeyError, TypeError):
            pass
    return names


def _only_config_errors(call: Callable[[], Any], fields: set[str]) -> Any:
    """The call's result, or None when it raised a ConfigError naming one of `fields`; nothing else passes."""
    try:
        return call()
    except ConfigError as err:
        assert type(err) is ConfigError
        assert err.key in fields, (err.key, fields)
        assert str(err).startswith(f"{err.key}: ")
        return None


# ---- the schema: TrainConfig.from_dict, to_dict, validate -------------------------------------
@FUZZ
@given(data=PRESETS)
@example(data={"train_iterations": 10**400})
@example(data={"image_size(height, width)": [10**400, 8]})
@example(data={"save_lora_name": 10**5000})
@example(data={"train_iterations": -(10**5000)})
@example(data={"network_blocks(BASE = TextEncoder)": [10**5000]})
@example(data={SECOND_PASS_KEY: {"network_rank": 10**400}})
def test_from_dict_refuses_with_config_errors_only(data: dict) -> None:
    cfg = _only_config_errors(lambda: TrainConfig.from_dict(data), _named(data))
    if cfg is not None:
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what it accepted exports and loads back the same


@FUZZ
@given(data=VALUES)
def test_non_object_settings_are_refused(data: Any) -> None:
    if not isinstance(data, dict):
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_dict(data)
        assert type(err.value) is ConfigError and err.value.key == "preset"


VALIDATED = ("save_lora_name", "train_optimizer_settings", "train_lr_scheduler_settings", "train_lr_step_rules",
             "train_min_timesteps", "train_max_timesteps", "network_dora", "network_type", "sample_every_n_steps",
             "sample_prompts")
CROSS_FIELDS = st.fixed_dictionaries({}, optional={
    "save_lora_name": _text(), "train_optimizer_settings": _text(40), "train_lr_scheduler_settings": _text(40),
    "train_lr_step_rules": _text(30), "train_min_timesteps": st.integers(0, 999),
    "train_max_timesteps": st.integers(1, 1000), "network_dora": st.booleans(),
    "network_type": st.sampled_from(["lierla", "c3lier", "loha", "lokr"]),
    "sample_every_n_steps": st.integers(0, 5), "sample_prompts": _text()})


@FUZZ
@given(data=CROSS_FIELDS | PRESETS)
@example(data={"save_lora_name": "\ud800"})
@example(data={"save_lora_name": "x", "train_optimizer_settings": "betas={[]: 1}"})
@example(data={"save_lora_name": "x", "train_lr_scheduler_settings": "a={1, []}"})
def test_validate_refuses_with_config_errors_only(data: dict) -> None:
    cfg = _only_config_errors(lambda: TrainConfig.from_dict(data), _named(data))
    if cfg is not None:
        _only_config_errors(cfg.validate, set(VALIDATED))


# ---- preset files: any bytes ----------------------------------------------------------------------
def _as_file_bytes(data: Any, bom: bool, crlf: bool, damage: int | None) -> bytes:
    """`data` as JSON (NaN/Infinity allowed, as Python writes them), with a BOM, CRLF or a broken byte."""
    try:
        text = json.dumps(data, indent=1, ensure_ascii=False)
    except ValueError:  # an int too long to print
        text = "{}"
    if crlf:
        text = text.replace("\n", "\r\n")
    raw = text.encode("utf-8", "surrogatepass")
    if damage is not None and raw:
        cut = damage % len(raw)
        raw = raw[:cut] + b"\xff" + raw[cut:]
    return (b"\xef\xbb\xbf" if bom else b"") + raw


PRESET_BYTES = st.builds(_as_file_bytes, PRESETS | VALUES, st.booleans(), st.booleans(), st.none() | st.integers(0)) \
    | st.binary(max_size=200)


@FUZZ
@given(raw=PRESET_BYTES)
@example(raw=b'{"train_iterations": ' + b"9" * 5000 + b"}")
@example(raw=b"[" * 100_000 + b"]" * 100_000)
@example(raw=b'{"save_lora_name": "\\ud800"}')
@example(raw=b'{\r\n "mode": "LoRA",\r\n "train_learning_rate": NaN\r\n}')
@example(raw=b"\xef\xbb\xbf\xff{}")
def test_preset_files_load_or_give_a_config_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        data = None
    _only_config_errors(lambda: load_preset(path), _named(data))


# ---- free-text settings: k=v and step rules ------------------------------------------------------
KV_LINE = st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.sampled_from(["weight_decay", "betas", "x", "1a", " eps", ""])
                    | _text(6), st.sampled_from(["=", " = ", "==", ":", ""]),
                    st.sampled_from(["0.1", "(0.9, 0.99)", "[1, 2]", "{[]: 1}", "{1, []}", "{'a': 1}", "True",
                                     "'s'", "1e999", "-", "((", "nan", "b'x'", "1j", "None", "{}"]) | _text(10))
KV_TEXT = st.lists(KV_LINE, max_size=5).flatmap(lambda lines: st.sampled_from([";", "\n", "\r\n", "; "]).map(
    lambda sep: sep.join(lines))) | _text(60)


@FUZZ
@given(text=KV_TEXT, field=st.sampled_from(TEXT_FIELDS))
@example(text="betas={[]: 1}", field="train_optimizer_settings")
@example(text="a={1, []}", field="train_lr_scheduler_settings")
@example(text="a=" + "-" * 100_000 + "1", field="train_optimizer_settings")
@example(text="a=" + "[" * 10_000, field="train_optimizer_settings")
def test_kv_settings_parse_or_name_their_field(text: str, field: str) -> None:
    out = _only_config_errors(lambda: parse_settings(text, field), {field})
    if out is not None:
        assert all(isinstance(k, str) and k.isidentifier() for k in out)
        assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())


RULE = st.builds(lambda m, s: f"{m}:{s}" if s is not None else m,
                 st.sampled_from(["1", "0.5", "0", "-1", "nan", "inf", "1e400", "x"]) | _text(4),
                 st.none() | st.sampled_from(["10", "20", "0", "-5", "1e3", "٣", "9" * 5000]) | _text(4))
RULES_TEXT = st.lists(RULE, max_size=5).map(",".join) | _text(40)


@FUZZ
@given(text=RULES_TEXT, field=st.sampled_from(TEXT_FIELDS))
@example(text="1:" + "9" * 5000 + ",0.1", field="train_lr_step_rules")
@example(text="1:10,1e400", field="train_lr_step_rules")
def test_step_rules_parse_or_name_their_field(text: str, field: str) -> None:
    rules = _only_config_errors(lambda: parse_step_rules(text, field), {field})
    if rules is None:
        return
    assert parse_step_rules(rules, field) == rules
    # whatever is accepted, diffusers' piecewise schedule takes as it is
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_piecewise_constant_schedule(opt, rules)
    for _ in range(3):
        opt.step()
        schedule.step()
    assert all(math.isfinite(lr) and lr >= 0 for lr in schedule.get_last_lr())
