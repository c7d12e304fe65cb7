"""Optimizers: every name builds and steps; settings reach the optimizer or fail as ConfigError."""
from __future__ import annotations

import importlib.util
import logging
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from trainer.config.schema import OPTIMIZERS, SCHEDULERS
from trainer.training.optim import OPTIMIZER_PACKAGES, build_optimizer, eval_weights, is_schedule_free, set_train_mode
from trainer.config.params import ConfigError
from trainer.training.schedulers import build_scheduler

ROOT = Path(__file__).resolve().parent.parent
EIGHT_BIT = {"AdamW8bit": "AdamW", "Adam8bit": "Adam", "SGDNesterov8bit": "SGDNesterov",
             "Lion8bit": "Lion", "PagedAdamW8bit": "AdamW", "PagedLion8bit": "Lion"}
LR_FREE = {"Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD"}
ONE_LR = {"Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptSGD"}
# RAdam makes no update until its variance estimate is defined (step 5).
STEPS_TO_MOVE = {"RAdamScheduleFree": 5}


def groups(unet_lr: float, te_lr: float) -> list[dict]:
    """A U-Net-like group and a text-encoder-like group with their own rates."""
    torch.manual_seed(0)
    unet = torch.nn.Parameter(torch.randn(8, 8))
    te = torch.nn.Parameter(torch.randn(16))
    return [{"params": [unet], "lr": unet_lr}, {"params": [te], "lr": te_lr}]


def step(opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss = sum(((p - 1.0) ** 2).sum() for g in opt.param_groups for p in g["params"])
    loss.backward()
    opt.step()


def test_registry_covers_the_schema():
    assert set(OPTIMIZER_PACKAGES) == set(OPTIMIZERS)
    assert OPTIMIZER_PACKAGES["Prodigy"] == "prodigyopt"
    assert OPTIMIZER_PACKAGES["CAME"] == "pytorch-optimizer"
    assert OPTIMIZER_PACKAGES["PagedLion8bit"] == "bitsandbytes"


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in EIGHT_BIT])
def test_every_optimizer_steps_and_keeps_group_rates(name):
    unet_lr = 1.0 if name in LR_FREE else 1e-3
    te_lr = unet_lr if name in ONE_LR else unet_lr / 2
    param_groups = groups(unet_lr, te_lr)
    before = [g["params"][0].detach().clone() for g in param_groups]
    opt = build_optimizer(name, param_groups, unet_lr, "")
    for _ in range(STEPS_TO_MOVE.get(name, 1)):
        step(opt)
    for g, old in zip(opt.param_groups, before):
        assert not torch.equal(g["params"][0].detach(), old), f"{name} did not move a parameter"
    assert [g["lr"] for g in opt.param_groups] == [unet_lr, te_lr]


@pytest.mark.parametrize("name", sorted(EIGHT_BIT))
def test_8bit_optimizers_step_or_say_what_to_install(name):
    param_groups = [{"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": 1e-3}]
    before = param_groups[0]["params"][0].detach().clone()
    try:
        opt = build_optimizer(name, param_groups, 1e-3, "")
    except ConfigError as err:
        assert err.key == "train_optimizer" and err.value == name
        assert "pip install bitsandbytes" in str(err) and f"choose {EIGHT_BIT[name]}" in str(err)
        return
    assert importlib.util.find_spec("bitsandbytes") is not None
    step(opt)
    assert not torch.equal(opt.param_groups[0]["params"][0].detach(), before)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match="AdamW8bit needs bitsandbytes with a GPU build; install it with "
                                          "pip install bitsandbytes, or choose AdamW"):
        build_optimizer("AdamW8bit", groups(1e-3, 1e-3), 1e-3, "")


def test_bitsandbytes_without_kernels_for_the_device_is_a_clear_error(monkeypatch):
    class NoKernels(torch.optim.SGD):
        def __init__(self, params, lr, betas=(0.9, 0.999), weight_decay=0.0):
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            raise RuntimeError("no kernel image for this device")

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(Lion8bit=NoKernels)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake.optim)
    with pytest.raises(ConfigError, match="or choose Lion .*no kernel image") as err:
        build_optimizer("Lion8bit", groups(1e-3, 1e-3), 1e-3, "betas=(0.9, 0.99)")
    assert err.value.key == "train_optimizer"


def test_missing_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(ConfigError, match="pip install lion-pytorch"):
        build_optimizer("Lion", groups(1e-4, 1e-4), 1e-4, "")


def test_too_old_package_says_upgrade(monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", types.ModuleType("schedulefree"))
    with pytest.raises(ConfigError, match="needs a newer schedulefree; upgrade it with pip install -U schedulefree"):
        build_optimizer("RAdamScheduleFree", groups(1e-3, 1e-3), 1e-3, "")


def test_unknown_optimizer_name():
    with pytest.raises(ConfigError) as err:
        build_optimizer("AdamX", groups(1e-4, 1e-4), 1e-4, "")
    assert err.value.key == "train_optimizer" and "AdamW" in str(err.value)


def test_settings_reach_the_optimizer():
    opt = build_optimizer("AdamW", groups(1e-4, 5e-5), 1e-4, "weight_decay=0.05; betas=[0.8, 0.95]\neps=1e-6")
    for g in opt.param_groups:
        assert g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    lion = build_optimizer("Lion", groups(1e-4, 1e-4), 1e-4, "betas=(0.95, 0.98); weight_decay=0.1")
    assert lion.param_groups[0]["betas"] == (0.95, 0.98) and lion.param_groups[0]["weight_decay"] == 0.1
    prodigy = build_optimizer("Prodigy", groups(1.0, 1.0), 1.0, "d_coef=2; decouple=false; growth_rate=inf")
    g = prodigy.param_groups[0]
    assert g["d_coef"] == 2 and g["decouple"] is False and g["growth_rate"] == float("inf")
    adam = build_optimizer("AdamW", groups(1e-4, 1e-4), 1e-4, "amsgrad=True")
    assert adam.param_groups[0]["amsgrad"] is True


def test_sgd_nesterov_defaults_and_override():
    sgd = build_optimizer("SGDNesterov", groups(1e-2, 1e-2), 1e-2, "")
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    sgd = build_optimizer("SGDNesterov", groups(1e-2, 1e-2), 1e-2, "momentum=0.5")
    assert sgd.param_groups[0]["momentum"] == 0.5


def test_adamw_uses_fused_kernels_where_torch_has_them():
    assert build_optimizer("AdamW", groups(1e-4, 1e-4), 1e-4, "").defaults["fused"] is True
    assert build_optimizer("Adam", groups(1e-4, 1e-4), 1e-4, "foreach=False").defaults["fused"] is None


@pytest.mark.parametrize("name, text, key", [
    ("AdamW", "foo=1", "foo"),
    ("CAME", "betas1=0.9", "betas1"),  # CAME takes **kwargs and would ignore the typo
    ("Prodigy", "weight_decay=0.01; decoupled=True", "decoupled"),
])
def test_unknown_setting_names_field_key_and_alternatives(name, text, key):
    lr = 1.0 if name in LR_FREE else 1e-4
    with pytest.raises(ConfigError) as err:
        build_optimizer(name, groups(lr, lr), lr, text)
    assert err.value.key == "train_optimizer_settings"
    assert err.value.value.startswith(f"{key}=")
    assert f"{name} does not take {key}; it takes " in err.value.problem
    assert "weight_decay" in err.value.problem


@pytest.mark.parametrize("text, key", [
    ("betas=5", "betas"), ("betas=(0.9,)", "betas"), ("weight_decay=heavy", "weight_decay"),
    ("amsgrad=1", "amsgrad"), ("amsgrad=yes", "amsgrad"), ("eps=-1", "eps"), ("lr=0.1", "lr"), ("betas=(0.9, 'x')", "betas"),
])
def test_bad_values_are_config_errors_naming_the_setting(text, key):
    with pytest.raises(ConfigError) as err:
        build_optimizer("AdamW", groups(1e-4, 1e-4), 1e-4, text)
    assert err.value.key == "train_optimizer_settings"
    assert key in str(err.value)


def test_adafactor_relative_step_by_default(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.training.optim"):
        opt = build_optimizer("AdaFactor", groups(1e-3, 1e-3), 1e-3, "")
    assert opt.defaults["lr"] is None and opt.defaults["relative_step"] is True
    assert "initial_lr" in caplog.text
    manual = build_optimizer("AdaFactor", groups(1e-3, 1e-3), 1e-3, "relative_step=False; scale_parameter=False")
    assert manual.defaults["lr"] == 1e-3 and manual.defaults["relative_step"] is False
    forced = build_optimizer("AdaFactor", groups(1e-3, 1e-3), 1e-3, "relative_step=False; warmup_init=True")
    assert forced.defaults["relative_step"] is True and forced.defaults["lr"] is None


def test_lr_free_optimizers_warn_on_small_rates_and_refuse_mixed_rates(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.training.optim"):
        build_optimizer("DAdaptAdam", groups(1e-4, 1e-4), 1e-4, "")
    assert "around 1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.training.optim"):
        build_optimizer("DAdaptAdam", groups(1.0, 0.0), 1.0, "")  # a rate of 0 freezes a group
    assert "around 1.0" not in caplog.text
    with pytest.raises(ConfigError) as err:
        build_optimizer("Prodigy", groups(1.0, 0.5), 1.0, "")
    assert err.value.key == "train_textencoder_learning_rate"


@pytest.mark.parametrize("name", ["RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree"])
def test_schedule_free_modes(name):
    opt = build_optimizer(name, groups(1e-3, 1e-3), 1e-3, "")
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"] is True
    for _ in range(STEPS_TO_MOVE.get(name, 1) + 1):
        step(opt)
    training_weights = opt.param_groups[0]["params"][0].detach().clone()
    with eval_weights(opt):
        assert opt.param_groups[0]["train_mode"] is False
        assert not torch.equal(opt.param_groups[0]["params"][0], training_weights)
    assert opt.param_groups[0]["train_mode"] is True
    assert torch.allclose(opt.param_groups[0]["params"][0], training_weights, atol=1e-6)
    set_train_mode(opt, False)
    assert opt.param_groups[0]["train_mode"] is False


def test_plain_optimizers_are_not_schedule_free():
    opt = build_optimizer("AdamW", groups(1e-3, 1e-3), 1e-3, "")
    assert not is_schedule_free(opt)
    with eval_weights(opt):  # a no-op that must not fail
        step(opt)
    set_train_mode(opt, False)


# ---- LR schedulers ---------------------------------------------------------------------------


TOTAL = 12
RULES = "1:3,0.1:6,0.01"


def _rules(s: int) -> float:
    return 1.0 if s < 3 else 0.1 if s < 6 else 0.01


def _cos(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# Multiplier of the base rate at step s, with no warmup (total 12 steps, num_cycles 2, power 2).
CLOSED = {
    "cosine": lambda s: _cos(s / TOTAL),
    "cosine_with_restarts": lambda s: _cos((2 * s / TOTAL) % 1.0) if s < TOTAL else 0.0,
    "linear": lambda s: 1 - s / TOTAL,
    "polynomial": lambda s: (1 - 1e-7) * (1 - s / TOTAL) ** 2 + 1e-7,
    "constant": lambda s: 1.0,
    "constant_with_warmup": lambda s: 1.0,
    "piecewise_constant": _rules,
    "step": lambda s: 0.5 ** (s // 3),
    "cosine_annealing": lambda s: 0.1 + 0.9 * _cos(s / TOTAL),
    "cosine_annealing_with_restarts": lambda s: _cos((s % 4) / 4),
    "exponential": lambda s: 0.9 ** s,
    "multi_step": lambda s: 0.1 ** ((s >= 3) + (s >= 6)),
}
SETTINGS = {"step": "step_size=3; gamma=0.5", "cosine_annealing": "eta_min=0.1",
            "cosine_annealing_with_restarts": "T_0=4", "multi_step": "milestones=[3, 6]"}


def lr_curve(name: str, *, warmup: int = 0, rules: str = "", settings: str | None = None,
             optimizer: str = "AdamW", steps: int = TOTAL) -> list[float]:
    """The U-Net group's rate at steps 0..steps; checks the text-encoder group stays at half of it."""
    text = SETTINGS.get(name, "") if settings is None else settings
    unet, te = both_curves(name, warmup=warmup, rules=rules, settings=text, optimizer=optimizer, steps=steps)
    if "eta_min" not in text:  # eta_min is an absolute rate, not a multiplier
        assert te == pytest.approx([u / 2 for u in unet], abs=1e-12)
    return unet


def both_curves(name: str, *, warmup: int, rules: str, settings: str, optimizer: str,
                steps: int) -> tuple[list[float], list[float]]:
    """Rates of the U-Net group (base 1.0) and the text-encoder group (base 0.5) at steps 0..steps."""
    opt = build_optimizer(optimizer, groups(1.0, 0.5), 1.0, "")
    sched = build_scheduler(name, opt, total_steps=TOTAL, warmup_steps=warmup, num_cycles=2, power=2.0,
                            step_rules=rules or (RULES if name == "piecewise_constant" else ""),
                            settings_text=settings)
    unet, te = [], []
    for _ in range(steps + 1):
        rates = sched.get_last_lr()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(rates)
        unet.append(rates[0])
        te.append(rates[1])
        step(opt)
        sched.step()
    return unet, te


def test_build_scheduler_is_importable_from_optim_too():
    from trainer.training.optim import build_scheduler as via_optim

    assert via_optim is build_scheduler
    # schedulers imported first is the order that would expose an import cycle.
    code = "import trainer.training.schedulers as s; from trainer.training.optim import build_scheduler as b; assert b is s.build_scheduler"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_closed_forms_cover_every_scheduler():
    assert set(CLOSED) == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_curve_matches_closed_form(name):
    assert lr_curve(name) == pytest.approx([CLOSED[name](s) for s in range(TOTAL + 1)], abs=1e-6)


def test_eta_min_is_an_absolute_floor_for_each_group():
    _, te = both_curves("cosine_annealing", warmup=0, rules="", settings="eta_min=0.1", optimizer="AdamW",
                        steps=TOTAL)
    assert te == pytest.approx([0.1 + 0.4 * _cos(s / TOTAL) for s in range(TOTAL + 1)])


def test_cosine_is_half_way_at_half_the_steps():
    assert lr_curve("cosine")[TOTAL // 2] == pytest.approx(0.5)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_warmup_ramps_linearly_for_every_scheduler(name):
    warm = 4
    curve = lr_curve(name, warmup=warm)
    ramp = [s / warm * (_rules(s) if name == "piecewise_constant" else 1.0) for s in range(warm)]
    assert curve[:warm] == pytest.approx(ramp)
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        return  # diffusers shapes these over the steps after warmup; checked below
    if name == "piecewise_constant":  # absolute rule steps, times the ramp
        expected = [_rules(s) * min(1.0, s / warm) for s in range(TOTAL + 1)]
    elif name in ("constant", "constant_with_warmup"):
        expected = [min(1.0, s / warm) for s in range(TOTAL + 1)]
    else:  # torch schedules start when the warmup ends
        shifted = {"cosine_annealing": lambda s: 0.1 + 0.9 * _cos(s / (TOTAL - warm))}
        f = shifted.get(name, CLOSED[name])
        expected = [s / warm if s < warm else f(s - warm) for s in range(TOTAL + 1)]
    assert curve == pytest.approx(expected, abs=1e-6)


def test_diffusers_schedules_decay_over_the_steps_after_warmup():
    warm = 4
    assert lr_curve("cosine", warmup=warm)[warm:] == pytest.approx(
        [_cos((s - warm) / (TOTAL - warm)) for s in range(warm, TOTAL + 1)])
    assert lr_curve("linear", warmup=warm)[warm:] == pytest.approx(
        [1 - (s - warm) / (TOTAL - warm) for s in range(warm, TOTAL + 1)])


def test_piecewise_rules_give_their_multipliers():
    curve = lr_curve("piecewise_constant", rules="1:10,0.1:20,0.01", steps=30)
    assert [curve[s] for s in (0, 9, 10, 19, 20, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_curve("step", rules="1:10,0.1:20,0.01", settings="", steps=30) == pytest.approx(curve)


def test_scheduler_defaults():
    assert lr_curve("step", settings="")[10] == pytest.approx(0.1)  # step_size 10, gamma 0.1
    assert lr_curve("cosine_annealing", settings="")[TOTAL] == pytest.approx(0.0, abs=1e-9)
    assert lr_curve("cosine_annealing_with_restarts", settings="")[10] == pytest.approx(1.0)
    assert lr_curve("exponential", settings="gamma=0.5")[3] == pytest.approx(0.125)


@pytest.mark.parametrize("name, text, key", [
    ("cosine", "eta_min=0.1", "eta_min"), ("step", "stepsize=3", "stepsize"),
    ("exponential", "gamma=0.9; T_max=3", "T_max"),
])
def test_unknown_scheduler_setting(name, text, key):
    with pytest.raises(ConfigError) as err:
        lr_curve(name, settings=text)
    assert err.value.key == "train_lr_scheduler_settings" and err.value.value.startswith(f"{key}=")
    assert f"does not take {key}" in err.value.problem


@pytest.mark.parametrize("name, text", [
    ("step", "step_size=2.5"), ("multi_step", ""), ("multi_step", "milestones=3"),
    ("exponential", "gamma=fast"), ("polynomial", "lr_end=2.0"),
])
def test_bad_scheduler_values(name, text):
    with pytest.raises(ConfigError) as err:
        lr_curve(name, settings=text)
    assert err.value.key == "train_lr_scheduler_settings"


def test_piecewise_needs_rules():
    opt = build_optimizer("AdamW", groups(1.0, 1.0), 1.0, "")
    with pytest.raises(ConfigError) as err:
        build_scheduler("piecewise_constant", opt, total_steps=10, warmup_steps=0, num_cycles=1,
                        power=1.0, step_rules="", settings_text="")
    assert err.value.key == "train_lr_step_rules"


def test_adafactor_relative_step_uses_its_own_schedule():
    from transformers.optimization import AdafactorSchedule

    opt = build_optimizer("AdaFactor", groups(1e-3, 1e-3), 1e-3, "")
    sched = build_scheduler("cosine", opt, total_steps=10, warmup_steps=2, num_cycles=1, power=1.0,
                            step_rules="", settings_text="")
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == pytest.approx([1e-3, 1e-3])
    opt.zero_grad()
    sum((p ** 2).sum() for g in opt.param_groups for p in g["params"]).backward()
    opt.step()
    sched.step()
    # The rate the optimizer computed itself: relative step 1e-2 scaled by the parameter RMS.
    expected = [float(opt._get_lr(g, opt.state[g["params"][0]])) for g in opt.param_groups]
    assert sched.get_last_lr() == pytest.approx(expected) and expected[0] != pytest.approx(1e-3)
    assert all(type(x) is float for x in sched.get_last_lr())
    opt.zero_grad(set_to_none=True)  # the rates do not fall back to the initial one without gradients
    assert sched.get_lr() == pytest.approx(expected)


def test_schedule_free_gets_a_constant_rate_and_its_own_warmup():
    curve = lr_curve("cosine", optimizer="AdamWScheduleFree", warmup=3)
    assert curve == pytest.approx([1.0] * (TOTAL + 1))
    opt = build_optimizer("AdamWScheduleFree", groups(1.0, 1.0), 1.0, "")
    build_scheduler("cosine", opt, total_steps=10, warmup_steps=3, num_cycles=1, power=1.0,
                    step_rules="", settings_text="")
    assert [g["warmup_steps"] for g in opt.param_groups] == [3, 3]
