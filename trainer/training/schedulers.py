"""LR scheduler registry for every name in config.SCHEDULERS, with warmup for all of them.

diffusers' schedules count warmup inside `total_steps` and use absolute step
numbers (piecewise rules too). The torch schedules (step, cosine_annealing, ...)
start after the warmup, so their step counts are relative to its end.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

from ..config.kvparse import parse_settings, parse_step_rules
from .optim import check_settings, check_value
from .schedule_free import is_schedule_free
from ..config.params import ConfigError

log = logging.getLogger(__name__)

FIELD = "train_lr_scheduler_settings"

# What build_scheduler passes to each diffusers schedule itself (as diffusers' get_scheduler does);
# the remaining keyword arguments of the schedule function may come from the settings text.
_DIFFUSERS_FIXED: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": ("num_warmup_steps",),
    "piecewise_constant": ("step_rules",),
    "linear": ("num_warmup_steps", "num_training_steps"),
    "cosine": ("num_warmup_steps", "num_training_steps"),
    "cosine_with_restarts": ("num_warmup_steps", "num_training_steps", "num_cycles"),
    "polynomial": ("num_warmup_steps", "num_training_steps", "power"),
}
# torch scheduler class and the defaults used unless the settings give them.
_TORCH: dict[str, tuple[str, dict[str, Any]]] = {
    "step": ("StepLR", {"step_size": 10}),
    "cosine_annealing": ("CosineAnnealingLR", {}),  # T_max: the steps after warmup
    "cosine_annealing_with_restarts": ("CosineAnnealingWarmRestarts", {"T_0": 10}),
    "exponential": ("ExponentialLR", {"gamma": 0.9}),
    "multi_step": ("MultiStepLR", {}),
}
_WHOLE = frozenset({"step_size", "T_max", "T_0", "T_mult"})
_SKIP = frozenset({"optimizer", "last_epoch", "verbose"})


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    num_cycles: int, power: float, step_rules: str, settings_text: str) -> LRScheduler:
    """The scheduler `name` for `optimizer`; call .step() once after each optimizer step."""
    if name not in _DIFFUSERS_FIXED and name not in _TORCH:
        known = ", ".join([*_DIFFUSERS_FIXED, *_TORCH])
        raise ConfigError("train_lr_scheduler", name, f"unknown scheduler; known: {known}")
    if total_steps < 1:
        raise ConfigError("train_iterations", total_steps, "must be at least 1")
    if warmup_steps < 0:
        raise ConfigError("train_lr_warmup_steps", warmup_steps, "must be 0 or more")
    settings = parse_settings(settings_text, FIELD)
    special = _self_scheduling(name, optimizer, warmup_steps, settings)
    if special is not None:
        return special
    if name == "step" and step_rules.strip():
        return _diffusers("piecewise_constant", optimizer, settings, warmup_steps,
                          {"step_rules": parse_step_rules(step_rules)}, shown="step with step rules")
    if name in _TORCH:
        return _torch(name, optimizer, settings, warmup_steps, total_steps)
    fixed = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps,
             "num_cycles": num_cycles, "power": power}
    if name == "piecewise_constant":
        if not step_rules.strip():
            raise ConfigError("train_lr_step_rules", step_rules,
                              "piecewise_constant needs step rules such as 1:100,0.1:200,0.01")
        fixed["step_rules"] = parse_step_rules(step_rules)
    if name == "constant" and warmup_steps > 0:
        return _diffusers("constant_with_warmup", optimizer, settings, warmup_steps, fixed, shown=name)
    return _diffusers(name, optimizer, settings, warmup_steps, fixed, shown=name)


def _self_scheduling(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int,
                     settings: dict[str, Any]) -> LRScheduler | None:
    """Schedule-free optimizers and relative-step AdaFactor set their own rate: no schedule on top."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    if isinstance(optimizer, Adafactor) and optimizer.defaults.get("relative_step"):
        _ignored("AdaFactor with relative_step=True", name, settings)
        return _adafactor_rates(AdafactorSchedule)(optimizer, initial_lr=optimizer.param_groups[0]["lr"])
    if not is_schedule_free(optimizer):
        return None
    owner = type(optimizer).__name__
    _ignored(owner, name, settings)
    if warmup_steps > 0:
        _schedule_free_warmup(owner, optimizer, warmup_steps)
    return LambdaLR(optimizer, lambda _: 1.0)


def _adafactor_rates(base: type) -> type:
    """transformers' AdafactorSchedule reporting plain floats, one per group.

    The original returns 0-d tensors, and a shorter list when some group has no
    gradient at that moment; logs and the UI want one float per group.
    """
    class AdafactorRates(base):  # type: ignore[misc, valid-type]
        def get_lr(self) -> list[float]:
            opt = self.optimizer
            rates = []
            for group, initial in zip(opt.param_groups, self.base_lrs):
                state = opt.state[group["params"][0]]
                rates.append(float(opt._get_lr(group, state)) if "step" in state else float(initial))
            return rates

    return AdafactorRates


def _ignored(owner: str, name: str, settings: dict[str, Any]) -> None:
    if name != "constant" or settings:
        log.warning("%s sets its own learning rate; the %s scheduler and its settings are not used", owner, name)


def _schedule_free_warmup(owner: str, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
    """Hand the warmup to the optimizer's own warmup_steps, which its averaging accounts for."""
    if "warmup_steps" not in optimizer.param_groups[0]:
        log.warning("%s has no warmup; train_lr_warmup_steps=%d is not used", owner, warmup_steps)
        return
    for group in optimizer.param_groups:
        if group["warmup_steps"] == 0:
            group["warmup_steps"] = warmup_steps


def _diffusers(name: str, optimizer: torch.optim.Optimizer, settings: dict[str, Any], warmup_steps: int,
               fixed: dict[str, Any], *, shown: str) -> LRScheduler:
    """A diffusers schedule; constant and piecewise ones get the warmup multiplied in."""
    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    names = _DIFFUSERS_FIXED[name]
    accepted = {k: v for k, v in _signature_defaults(func).items() if k not in names}
    extra = check_settings(shown, settings, accepted, FIELD)
    args = {k: fixed[k] for k in names}
    try:
        scheduler = func(optimizer, **args, **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(FIELD, _as_text(settings), f"{shown} refused its arguments: {err}") from err
    if name == "piecewise_constant" and warmup_steps > 0:
        return _times_warmup(optimizer, scheduler.lr_lambdas, warmup_steps)
    return scheduler


def _times_warmup(optimizer: torch.optim.Optimizer, lambdas: list[Callable[[int], float]],
                  warmup_steps: int) -> LambdaLR:
    """Multiply each group's schedule by a linear ramp from 0 to 1 over the warmup steps."""
    def ramped(f: Callable[[int], float]) -> Callable[[int], float]:
        return lambda step: f(step) * min(1.0, step / warmup_steps)

    return LambdaLR(optimizer, [ramped(f) for f in lambdas])


def _torch(name: str, optimizer: torch.optim.Optimizer, settings: dict[str, Any], warmup_steps: int,
           total_steps: int) -> LRScheduler:
    """A torch.optim.lr_scheduler schedule, after a linear warmup when there is one."""
    cls_name, defaults = _TORCH[name]
    cls = getattr(torch.optim.lr_scheduler, cls_name)
    accepted = {k: v for k, v in _signature_defaults(cls.__init__).items() if k not in _SKIP}
    extra = check_settings(name, settings, accepted, FIELD)
    kwargs = {**defaults, **extra}
    if name == "cosine_annealing":
        kwargs.setdefault("T_max", max(1, total_steps - warmup_steps))
    _check_torch_args(name, kwargs)
    # The ramp is built first so that SequentialLR, which undoes each constructor's initial
    # step, starts from it.
    warmup = LambdaLR(optimizer, lambda step: step / warmup_steps) if warmup_steps > 0 else None
    try:
        main = cls(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(FIELD, _as_text(settings), f"{name} refused its arguments: {err}") from err
    if warmup is None:
        return main
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def _check_torch_args(name: str, kwargs: dict[str, Any]) -> None:
    """Type checks the torch constructors leave to the first step."""
    for key in _WHOLE & kwargs.keys():
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)) or value != int(value) or value < 1:
            raise ConfigError(FIELD, f"{key}={value}", f"{key} must be a whole number of steps, 1 or more")
        kwargs[key] = int(value)
    if name == "multi_step":
        milestones = kwargs.get("milestones")
        if not isinstance(milestones, (list, tuple)) or not milestones or not all(
                isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones):
            raise ConfigError(FIELD, f"milestones={milestones}",
                              "multi_step needs milestones=[steps, ...], whole numbers above 0")
    for key in ("gamma", "eta_min"):
        if key in kwargs:
            kwargs[key] = check_value(key, kwargs[key], 0.0, FIELD)


def _signature_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments of `func` (bar the optimizer) with their defaults."""
    out = {}
    for pname, prm in inspect.signature(func).parameters.items():
        if pname in ("self", "optimizer", "last_epoch") or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        out[pname] = prm.default
    return out


def _as_text(settings: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in settings.items())


__all__ = ["build_scheduler"]
