"""Parsers for the free-text settings fields ("k=v; k=v" and LR step rules)."""
from __future__ import annotations

import ast
from typing import Any

from .params import ConfigError


def parse_settings(text: str, field: str) -> dict[str, Any]:
    """Parse "k=v" pairs, one per line or separated by ';', values as Python literals.

    A bare word that is not a literal (``foo=bar``) is kept as the string "bar",
    as TrainTrain users write ``decouple=True`` and ``d_coef=2`` alike.
    """
    out: dict[str, Any] = {}
    if not text or not text.strip():
        return out
    for raw in text.replace(";", "\n").splitlines():
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        if "=" not in item:
            raise ConfigError(field, item, "expected key=value")
        key, _, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not key.isidentifier():
            raise ConfigError(field, item, f"{key!r} is not a valid setting name")
        if key in out:
            raise ConfigError(field, item, f"{key!r} is given twice")
        out[key] = _literal(field, item, val)
    return out


def _literal(field: str, item: str, val: str) -> Any:
    if not val:
        raise ConfigError(field, item, "has no value after '='")
    try:
        value = ast.literal_eval(val)
    except (TypeError, MemoryError, RecursionError):  # {[]: 1}, {1, []}; nesting the parser cannot hold
        raise ConfigError(field, item, "value is not a number, string, tuple, list or True/False") from None
    except (ValueError, SyntaxError):
        if val.replace("_", "").replace("-", "").isalnum():
            return val
        raise ConfigError(field, item, "value is not a number, string, tuple, list or True/False") from None
    if isinstance(value, float) and value != value:
        raise ConfigError(field, item, "value is NaN")
    return value


def parse_step_rules(text: str, field: str = "train_lr_step_rules") -> str:
    """Check "mult:steps,mult:steps,...,mult" (diffusers' piecewise_constant rules).

    Returns the normalised rule string that diffusers' scheduler takes.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(field, text, "is empty")
    last_step = 0
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if ":" in part:
            mult, _, step = part.partition(":")
            _number(field, text, mult)
            try:
                step_n = int(step)
            except ValueError:
                raise ConfigError(field, text, f"step {step!r} in {part!r} is not a whole number") from None
            if step_n <= last_step:
                raise ConfigError(field, text, "steps must increase from left to right")
            last_step = step_n
        elif not is_last:
            raise ConfigError(field, text, f"{part!r} needs the form multiplier:step")
        else:
            _number(field, text, part)
    if ":" in parts[-1]:
        raise ConfigError(field, text, "must end with the final multiplier, e.g. 1:100,0.1")
    return ",".join(parts)


def _number(field: str, text: str, s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise ConfigError(field, text, f"{s!r} is not a number") from None
    if x != x or x < 0 or x in (float("inf"),):
        raise ConfigError(field, text, f"{s!r} must be a finite number ≥ 0")
    return x
