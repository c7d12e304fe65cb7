"""Per-block control: learning-rate weights and ranks per TrainTrain block ID.

Two ways to write learning-rate weights, both resolved to {block ID: weight}:

- ``network_block_lr_weights``: "IN01=0.5, M00=1, OUT11=0" (BASE is the text encoder);
- sd-scripts' hierarchical form: ``down_lr_weight`` (12 values, IN00-IN11),
  ``mid_lr_weight`` (one value, M00), ``up_lr_weight`` (12 values, OUT00-OUT11).
  down/up also take a preset name (sine, cosine, linear, reverse_linear, zeros)
  with an optional "+number" added to every value, as in sd-scripts.

The per-ID form wins where both name a block. SDXL has IN00-IN08 and OUT00-OUT08:
the values for IN09-IN11 and OUT09-OUT11 find no layer there.
"""
from __future__ import annotations

import math
import re

from ..config.params import BLOCK_IDS, ConfigError

N_HIER = 12  # sd-scripts' down/up lists always have 12 entries
MAX_WEIGHT = 1000.0
MAX_DIM = 1024
_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def _number(field: str, item: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(field, item, f"{text.strip()!r} is not a number") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
        raise ConfigError(field, item, f"weights must be numbers from 0 to {MAX_WEIGHT:g}")
    return value


def _items(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[,;\n]", text or "") if s.strip()]


def parse_block_map(text: str, field: str) -> dict[str, str]:
    """ "IN01=0.5, OUT11=0" -> {"IN01": "0.5", "OUT11": "0"} with IDs checked; values unparsed."""
    out: dict[str, str] = {}
    for item in _items(text):
        name, sep, value = item.partition("=")
        bid = name.strip().upper()
        if not sep or not value.strip():
            raise ConfigError(field, item, "expected BLOCK=value, e.g. IN01=0.5")
        if bid not in BLOCK_IDS:
            raise ConfigError(field, item, f"unknown block ID {name.strip()!r}; known: {', '.join(BLOCK_IDS)}")
        if bid in out:
            raise ConfigError(field, item, f"{bid} is given twice")
        out[bid] = value.strip()
    return out


def _preset(field: str, text: str) -> list[float] | None:
    """sd-scripts' named curves over 12 blocks, or None when `text` names none."""
    name, _, plus = text.strip().lower().partition("+")
    if name not in _PRESETS:
        return None
    base = _number(field, text, plus) if plus else 0.0
    steps = [i / (N_HIER - 1) for i in range(N_HIER)]
    curve = {
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * N_HIER,
    }[name]
    return [v + base for v in curve]


def parse_hier(text: str, field: str, count: int) -> list[float]:
    """`count` comma-separated weights (or, for 12, a preset name); [] when empty."""
    if not text or not text.strip():
        return []
    if count == N_HIER:
        curve = _preset(field, text)
        if curve is not None:
            return curve
    values = [_number(field, text, s) for s in text.split(",") if s.strip()]
    if len(values) != count:
        extra = f" or one of {', '.join(_PRESETS)} (with an optional +number)" if count == N_HIER else ""
        raise ConfigError(field, text, f"expected {count} comma-separated numbers{extra}, got {len(values)}")
    return values


def lr_weights(cfg) -> dict[str, float]:
    """{block ID: learning-rate weight} for every block the settings name (others keep 1)."""
    out: dict[str, float] = {}
    down = parse_hier(cfg.down_lr_weight, "down_lr_weight", N_HIER)
    mid = parse_hier(cfg.mid_lr_weight, "mid_lr_weight", 1)
    up = parse_hier(cfg.up_lr_weight, "up_lr_weight", N_HIER)
    out.update({f"IN{i:02d}": w for i, w in enumerate(down)})
    if mid:
        out["M00"] = mid[0]
    out.update({f"OUT{i:02d}": w for i, w in enumerate(up)})
    field = "network_block_lr_weights"
    for bid, value in parse_block_map(cfg.network_block_lr_weights, field).items():
        out[bid] = _number(field, f"{bid}={value}", value)
    return out


def block_dims(cfg) -> dict[str, int]:
    """{block ID: rank} from ``network_block_dims`` ("IN04=8, OUT11=32"; BASE is the text encoder)."""
    field = "network_block_dims"
    out: dict[str, int] = {}
    for bid, value in parse_block_map(cfg.network_block_dims, field).items():
        item = f"{bid}={value}"
        if not value.isdigit() or not 1 <= int(value) <= MAX_DIM:
            raise ConfigError(field, item, f"a rank must be a whole number from 1 to {MAX_DIM}")
        out[bid] = int(value)
    return out


__all__ = ["block_dims", "lr_weights", "parse_block_map", "parse_hier"]
