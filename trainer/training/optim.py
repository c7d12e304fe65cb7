"""Optimizer registry: build any optimizer in config.OPTIMIZERS from param groups and "k=v" text.

Settings are checked against the optimizer's constructor signature before it is
built, so a typo or a wrong type is a ConfigError naming the setting, not a
TypeError from inside a third-party package.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.kvparse import parse_settings
from ..config.params import ConfigError
from .schedule_free import eval_weights, is_schedule_free, set_train_mode  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FIELD = "train_optimizer_settings"
_BNB = "bitsandbytes"
# Constructor arguments the user never sets through the settings text.
_NOT_SETTINGS = frozenset({"self", "params", "lr"})


@dataclass(frozen=True)
class _Spec:
    module: str
    attr: str
    package: str
    defaults: dict[str, Any] = field(default_factory=dict)


_NESTEROV = {"nesterov": True, "momentum": 0.9}
_SPECS: dict[str, _Spec] = {
    "AdamW": _Spec("torch.optim", "AdamW", "torch"),
    "Adam": _Spec("torch.optim", "Adam", "torch"),
    "SGDNesterov": _Spec("torch.optim", "SGD", "torch", _NESTEROV),
    "AdaFactor": _Spec("transformers.optimization", "Adafactor", "transformers",
                       {"relative_step": True, "scale_parameter": True, "warmup_init": False}),
    "Lion": _Spec("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": _Spec("prodigyopt", "Prodigy", "prodigyopt"),
    "DAdaptAdam": _Spec("dadaptation", "DAdaptAdam", "dadaptation"),
    "DAdaptLion": _Spec("dadaptation", "DAdaptLion", "dadaptation"),
    "DAdaptAdaGrad": _Spec("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "DAdaptAdan": _Spec("dadaptation", "DAdaptAdan", "dadaptation"),
    "DAdaptSGD": _Spec("dadaptation", "DAdaptSGD", "dadaptation"),
    "RAdamScheduleFree": _Spec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "AdamWScheduleFree": _Spec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "SGDScheduleFree": _Spec("schedulefree", "SGDScheduleFree", "schedulefree"),
    "CAME": _Spec("pytorch_optimizer", "CAME", "pytorch-optimizer"),
    "Tiger": _Spec("pytorch_optimizer", "Tiger", "pytorch-optimizer"),
    "AdamW8bit": _Spec("bitsandbytes.optim", "AdamW8bit", _BNB),
    "Adam8bit": _Spec("bitsandbytes.optim", "Adam8bit", _BNB),
    "SGDNesterov8bit": _Spec("bitsandbytes.optim", "SGD8bit", _BNB, _NESTEROV),
    "Lion8bit": _Spec("bitsandbytes.optim", "Lion8bit", _BNB),
    "PagedAdamW8bit": _Spec("bitsandbytes.optim", "PagedAdamW8bit", _BNB),
    "PagedLion8bit": _Spec("bitsandbytes.optim", "PagedLion8bit", _BNB),
}

#: The pip package each optimizer needs (torch and transformers come with every host).
OPTIMIZER_PACKAGES: dict[str, str] = {name: spec.package for name, spec in _SPECS.items()}

# The 8-bit optimizer each bitsandbytes one stands in for, for the error message.
_BNB_FALLBACK = {"AdamW8bit": "AdamW", "Adam8bit": "Adam", "SGDNesterov8bit": "SGDNesterov",
                 "Lion8bit": "Lion", "PagedAdamW8bit": "AdamW", "PagedLion8bit": "Lion"}
_LR_FREE = ("DAdapt", "Prodigy")
# These step with one shared rate and raise at the first step if groups differ (0 freezes a group).
_ONE_LR = frozenset({"Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptSGD"})


def build_optimizer(name: str, param_groups: list[dict], lr: float, settings_text: str) -> torch.optim.Optimizer:
    """Build optimizer `name`; each group keeps its own "lr", `lr` is the default for the rest."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError("train_optimizer", name, f"unknown optimizer; known: {', '.join(_SPECS)}")
    settings = parse_settings(settings_text, FIELD)
    cls = _load_class(name, spec)
    accepted = accepted_keywords(cls)
    settings = check_settings(name, settings, accepted, FIELD)
    kwargs = {**spec.defaults, **settings}
    groups = _copy_groups(param_groups, lr)
    ctor_lr: float | None = lr
    if name == "AdaFactor":
        ctor_lr = _adafactor_args(kwargs, lr)
    elif name in ("AdamW", "Adam") and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = _fused_supported(groups)
    if name.startswith(_LR_FREE):
        _check_lr_free(name, groups)
    try:
        optimizer = cls(groups, lr=ctor_lr, **kwargs)
    except (TypeError, ValueError) as err:
        where, what = (FIELD, settings_text.strip()) if settings else ("train_optimizer", name)
        raise ConfigError(where, what, f"{name} refused its arguments: {err}") from err
    if spec.package == _BNB:
        _probe_bitsandbytes(name, cls, groups, kwargs)
    if is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers refuse to step in eval mode
    return optimizer


def _load_class(name: str, spec: _Spec) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise ConfigError("train_optimizer", name, _missing_message(name, spec.package)) from err
    cls = getattr(module, spec.attr, None)
    if cls is None:  # e.g. RAdamScheduleFree arrived in schedulefree 1.4
        raise ConfigError("train_optimizer", name, f"{name} needs a newer {spec.package}; "
                                                   f"upgrade it with pip install -U {spec.package}")
    return cls


def _missing_message(name: str, package: str) -> str:
    if package == _BNB:
        return (f"{name} needs bitsandbytes with a GPU build; install it with pip install bitsandbytes, "
                f"or choose {_BNB_FALLBACK[name]}")
    return f"{name} needs the {package} package; install it with pip install {package}"


def accepted_keywords(cls: type) -> dict[str, Any]:
    """Named constructor arguments a user may set, with their defaults (inspect.Parameter.empty if none).

    **kwargs catch-alls are left out on purpose: some packages accept and ignore
    any keyword, so a typo would pass unnoticed.
    """
    out: dict[str, Any] = {}
    for pname, prm in inspect.signature(cls.__init__).parameters.items():
        if pname in _NOT_SETTINGS or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        out[pname] = prm.default
    return out


def check_settings(owner: str, settings: dict[str, Any], accepted: dict[str, Any], field_name: str) -> dict[str, Any]:
    """Refuse unknown keys and values whose type does not match the default; return cleaned values."""
    clean: dict[str, Any] = {}
    for key, value in settings.items():
        item = f"{key}={value}"
        if key == "lr":
            raise ConfigError(field_name, item, "set the learning rate with train_learning_rate, not here")
        if key not in accepted:
            raise ConfigError(field_name, item, f"{owner} does not take {key}; it takes {', '.join(accepted)}")
        clean[key] = check_value(key, value, accepted[key], field_name)
    return clean


def check_value(key: str, value: Any, default: Any, field_name: str) -> Any:
    """Check `value` against the type of `default`; numbers may be written as "inf", flags as true/false."""
    item = f"{key}={value}"
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # lower-case true/false, as in JSON and TrainTrain's UI
        if not isinstance(value, bool):
            raise ConfigError(field_name, item, f"{key} must be True or False")
        return value
    if isinstance(default, (int, float)):
        return _number(key, value, field_name)
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(default):
            raise ConfigError(field_name, item, f"{key} must be {len(default)} numbers like {default}")
        return tuple(_number(key, v, field_name, item) for v in value)
    return value  # no typed default (None or required): the constructor checks it


def _number(key: str, value: Any, field_name: str, item: str | None = None) -> float | int:
    item = item or f"{key}={value}"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(field_name, item, f"{key} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, item, f"{key} must be a number")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(field_name, item, f"{key} must be a number")
    if isinstance(value, int) and abs(value) > 2 ** 1023:  # beyond any float: the first step would fail
        raise ConfigError(field_name, item, f"{key} is far too large a number")
    return value


def _copy_groups(param_groups: list[dict], lr: float) -> list[dict]:
    """Copies of the groups, each with a list of params and an explicit "lr"."""
    if not param_groups:
        raise ConfigError("train_optimizer", "[]", "there are no parameters to train")
    groups = []
    for group in param_groups:
        g = dict(group)
        g["params"] = list(g["params"])
        g.setdefault("lr", lr)
        groups.append(g)
    return groups


def _adafactor_args(kwargs: dict[str, Any], lr: float) -> float | None:
    """TrainTrain's AdaFactor: relative_step unless turned off; warmup_init needs relative_step."""
    if kwargs.get("warmup_init") and not kwargs.get("relative_step"):
        log.warning("AdaFactor: warmup_init=True needs relative_step=True; turning relative_step on")
        kwargs["relative_step"] = True
    if kwargs.get("relative_step"):
        log.warning("AdaFactor with relative_step=True computes its own step size; "
                    "the learning rate %g is used only as initial_lr", lr)
        return None
    return lr


def _fused_supported(groups: list[dict]) -> bool:
    """Whether torch has fused Adam kernels for every parameter's device and dtype."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        log.debug("torch no longer exposes its fused-kernel device list; letting it choose")
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and p.is_floating_point() for g in groups for p in g["params"])


def _check_lr_free(name: str, groups: list[dict]) -> None:
    """D-Adaptation and Prodigy scale one adaptive step; warn on tiny rates, refuse mixed ones."""
    rates = sorted({g["lr"] for g in groups if g["lr"] != 0})
    if name in _ONE_LR and len(rates) > 1:
        field_name, advice = _mixed_rate_source(groups)
        raise ConfigError(field_name, rates,
                          f"{name} uses one learning rate for all parameters (0 freezes a part); {advice}")
    smallest = min(rates, default=0.0)
    if 0 < smallest < 0.1:
        log.warning("%s adapts the step size itself and expects a learning rate around 1.0; got %g",
                    name, smallest)


def _mixed_rate_source(groups: list[dict]) -> tuple[str, str]:
    """The setting that made the groups' rates differ, judged by the group names, and what to do."""
    names = [str(g.get("name", "")) for g in groups if g["lr"] != 0]
    if any(n.endswith("_up") for n in names):
        return "loraplus_lr_ratio", "turn LoRA+ off (ratio 0) or choose an optimizer such as AdamW"
    if any(n.startswith("unet_") for n in names):
        return "network_block_lr_weights", "use block weights of 0 or 1 only, or choose an optimizer such as AdamW"
    return "train_textencoder_learning_rate", "leave the text-encoder rate empty or give it the same value"


def _probe_bitsandbytes(name: str, cls: type, groups: list[dict], kwargs: dict[str, Any]) -> None:
    """One step on a throwaway tensor, so a build without kernels for this device fails now, clearly.

    Called after the real optimizer was built, so the arguments are known to be accepted.
    """
    first = groups[0]["params"][0]
    # 4096 elements: smaller tensors skip bitsandbytes' 8-bit path.
    probe = torch.nn.Parameter(torch.zeros(4096, device=first.device, dtype=torch.float32))
    probe.grad = torch.ones_like(probe)
    try:
        cls([probe], lr=1e-3, **kwargs).step()
    except Exception as err:  # bitsandbytes raises assorted errors for unsupported devices
        message = _missing_message(name, _BNB)
        raise ConfigError("train_optimizer", name, f"{message} ({type(err).__name__}: {err})") from err


def __getattr__(name: str) -> Any:
    """`from .optim import build_scheduler` works too; schedulers.py imports this module, so the
    name is resolved on first use rather than at import time (no import cycle)."""
    if name == "build_scheduler":
        from .schedulers import build_scheduler

        return build_scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OPTIMIZER_PACKAGES",
    "accepted_keywords",
    "build_optimizer",
    "check_settings",
    "check_value",
    "eval_weights",
    "is_schedule_free",
    "set_train_mode",
]
