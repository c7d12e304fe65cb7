"""Parameter metadata and value coercion for the schema in config.py.

Values arrive as TrainTrain wrote them (strings for numbers, "" for "use the
default", lower-case choice names) or as native JSON types; every coercion
either returns a clean value or raises ConfigError naming the key and value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

MODES: tuple[str, ...] = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")

# TrainTrain / LoRA Block Weight IDs. BASE means the text encoder(s).
BLOCK_IDS: tuple[str, ...] = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(12))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(12))
)

# The folded groups of optional settings, most used first: (key, title). A field names its
# group in its metadata (param(..., group=...)); the UI lays the groups out in this order.
GROUPS: tuple[tuple[str, str], ...] = (
    ("network", "Network"),
    ("data", "Data and buckets"),
    ("lr", "Learning rate and scheduler"),
    ("saving", "Saving and state"),
    ("samples", "Samples and grid"),
    ("captions", "Captions"),
    ("loss", "Loss"),
    ("noise", "Noise and timesteps"),
    ("precision", "Precision and model"),
    ("pairs", "Difference and ADDifT"),
    ("flow", "FLUX and flow matching"),
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A setting was refused. `key` and `value` say which and what."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}: {problem} (got {shown(value)})")


def shown(value: Any) -> str:
    """repr(value), or a description when Python refuses to print it (an int of over 4300 digits)."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return f"a {type(value).__name__} that cannot be shown"
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"


@dataclass(frozen=True)
class Param:
    """What the UI, presets, CLI and API need to know about one setting."""

    key: str
    kind: str  # int float optfloat bool choice str text path size blocks
    label: str
    help: str
    section: str = "optional"  # "required" | "optional" | "hidden"
    modes: tuple[str, ...] = MODES
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    legacy: tuple[str, ...] = ()
    group: str = ""  # an optional setting's group (GROUPS); "" for the required ones at the top
    families: tuple[str, ...] = ()  # the model families that use it; () for every family

    def used_by(self, family: str | None) -> bool:
        """Whether a model of `family` uses this setting (None: the family is not known yet)."""
        return not self.families or family is None or family in self.families

    @property
    def widget(self) -> str:
        """The widget the UI builds for this kind."""
        return {
            "bool": "checkbox", "choice": "dropdown", "blocks": "checkboxgroup",
            "text": "textarea",
        }.get(self.kind, "textbox")


def param(kind: str, default: Any, label: str, help: str, **kw: Any) -> Any:
    """Declare a schema field: a dataclass field carrying its Param."""
    key = kw.pop("key", None)
    meta = {"param_kw": dict(kind=kind, label=label, help=help, key=key, **kw)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _range(p: Param, value: Any, x: float) -> None:
    if p.minimum is not None and x < p.minimum:
        raise ConfigError(p.key, value, f"must be at least {p.minimum:g}")
    if p.maximum is not None and x > p.maximum:
        raise ConfigError(p.key, value, f"must be at most {p.maximum:g}")


def _as_number(p: Param, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(p.key, value, "expected a number, not true/false")
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # an int beyond any float
            raise ConfigError(p.key, value, "is far too large a number") from None
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise ConfigError(p.key, value, "expected a number") from None
    else:
        raise ConfigError(p.key, value, "expected a number")
    if not math.isfinite(x):
        raise ConfigError(p.key, value, "must be a finite number")
    return x


def _int(p: Param, value: Any) -> int:
    x = _as_number(p, value)
    if x != int(x):
        raise ConfigError(p.key, value, "expected a whole number")
    _range(p, value, x)
    return int(x)


def _float(p: Param, value: Any) -> float:
    x = _as_number(p, value)
    _range(p, value, x)
    return x


def _optfloat(p: Param, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _float(p, value)


def _bool(p: Param, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(p.key, value, "expected true or false")


def _choice(p: Param, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(p.key, value, f"expected one of {', '.join(p.choices)}")
    wanted = value.strip().lower()
    for alias, target in p.aliases:
        if wanted == alias.lower():
            wanted = target.lower()
    for choice in p.choices:
        if choice.lower() == wanted:
            return choice
    raise ConfigError(p.key, value, f"expected one of {', '.join(p.choices)}")


def _str(p: Param, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(p.key, value, "expected text")
    try:
        text = str(value)
    except ValueError:  # an int of over 4300 digits
        raise ConfigError(p.key, value, "is far too long a number") from None
    if "\x00" in text:
        raise ConfigError(p.key, value, "contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a "\ud800" escape in JSON
            raise ConfigError(p.key, value, f"contains an invalid character at position {exc.start}") from None
    if p.kind != "text":
        text = text.strip()
    if p.maximum is not None and len(text) > p.maximum:
        raise ConfigError(p.key, value, f"is longer than {p.maximum:g} characters")
    return text


def _size(p: Param, value: Any) -> list[int]:
    """"512" -> [512, 512]; "512,768" or [512, 768] -> [height, width]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parts: list[Any] = [value, value]
    elif isinstance(value, str):
        parts = [s for s in value.replace("x", ",").replace(" ", ",").split(",") if s]
        parts = parts * 2 if len(parts) == 1 else parts
    elif isinstance(value, (list, tuple)):
        parts = list(value) * 2 if len(value) == 1 else list(value)
    else:
        raise ConfigError(p.key, value, "expected a size such as 512 or 512,768")
    if len(parts) != 2:
        raise ConfigError(p.key, value, "expected one or two numbers (height, width)")
    out = []
    for part in parts:
        n = _int(p, part)
        if n % 8:
            raise ConfigError(p.key, value, "each side must be a multiple of 8")
        out.append(n)
    return out


def _blocks(p: Param, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [s for s in value.replace(";", ",").split(",") if s.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(p.key, value, "expected a list of block IDs such as BASE, IN01, M00")
    wanted = set()
    for item in value:
        name = item.strip().upper() if isinstance(item, str) else None
        if name not in BLOCK_IDS:
            raise ConfigError(p.key, item, f"unknown block ID; known: {', '.join(BLOCK_IDS)}")
        wanted.add(name)
    return [b for b in BLOCK_IDS if b in wanted]


COERCERS: dict[str, Callable[[Param, Any], Any]] = {
    "int": _int, "float": _float, "optfloat": _optfloat, "bool": _bool,
    "choice": _choice, "str": _str, "text": _str, "path": _str,
    "size": _size, "blocks": _blocks,
}


def coerce(p: Param, value: Any, default: Any) -> Any:
    """Turn a preset/CLI/UI value into the field's type; "" means the default."""
    if isinstance(value, str) and not value.strip() and p.kind not in ("str", "text", "path", "optfloat"):
        return default
    return COERCERS[p.kind](p, value)


def export(p: Param, value: Any) -> Any:
    """The value as a preset file stores it (TrainTrain reads these back)."""
    if p.kind == "size":
        h, w = value
        return str(h) if h == w else f"{h},{w}"
    if p.kind == "optfloat":
        return "" if value is None else value
    if p.kind == "blocks":
        return list(value)
    return value
