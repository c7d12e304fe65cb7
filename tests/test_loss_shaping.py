"""Loss shaping, the loss side: scheduled Huber / Smooth-L1 and debiased estimation on the tensors
they produce, the options' checks, and whole jobs with every loss option on (the noise side is
in test_loss_noise.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.config.schema import TrainConfig
from trainer.training.engine import Trainer
from trainer.training.losses import (DEBIASED_SNR_RANGE, DiffusionLoss, debiased_weight, diffusion_loss, huber_c,
                            min_snr_weight, pseudo_huber, smooth_l1)
from trainer.config.params import ConfigError
from trainer.config.presets import load_preset

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.modekit import mode_job, write_pair
from tests.tiny import tiny_scheduler

# snr = ᾱ/(1-ᾱ) = 1, 9, 99 and 0 (a zero-terminal-SNR last step).
ALPHAS = torch.tensor([0.5, 0.9, 0.99, 0.0])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- scheduled Huber ----

def test_huber_c_constant_and_exponential_per_timestep():
    ac = tiny_scheduler().alphas_cumprod
    t = torch.tensor([0, 250, 500, 999])
    assert huber_c(t, ac, 0.1, "constant").tolist() == pytest.approx([0.1] * 4)
    # exp(-αt), α = -ln(0.1)/1000: 0.1^(t/1000), from 1 at t=0 down to 0.1 at t=1000.
    want = [0.1 ** (x / 1000) for x in (0, 250, 500, 999)]
    assert huber_c(t, ac, 0.1, "exponential").tolist() == pytest.approx(want, rel=1e-5)


def test_huber_c_snr_schedule_per_timestep():
    ac = tiny_scheduler().alphas_cumprod
    t = torch.tensor([0, 100, 500, 900, 999])
    a = ac.double()[t]
    sigma = ((1 - a) / a).sqrt()
    want = (0.9 / (1 + sigma) ** 2 + 0.1).tolist()
    got = huber_c(t, ac, 0.1, "snr")
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert got[0] > 0.9 and got[-1] < 0.11 and bool((got[1:] < got[:-1]).all())  # ~MSE clean, Huber noisy
    # ᾱ = 0 (zero terminal SNR): σ is infinite and c is exactly huber_c, not NaN.
    assert huber_c(torch.tensor([3]), ALPHAS, 0.1, "snr").tolist() == pytest.approx([0.1])


def test_unknown_huber_schedule():
    with pytest.raises(ConfigError) as err:
        huber_c(torch.tensor([0]), ALPHAS, 0.1, "cosine")
    assert err.value.key == "huber_schedule" and err.value.value == "cosine"


def test_pseudo_huber_and_smooth_l1_equal_the_formula():
    a = torch.tensor([[0.3, -1.2, 5.0], [2.0, 0.0, -0.05]], dtype=torch.float64)
    b = torch.tensor([[0.1, 0.4, -1.0], [-2.0, 0.0, 0.05]], dtype=torch.float64)
    c = torch.tensor([[0.1], [0.7]], dtype=torch.float64)
    d2 = (a - b) ** 2
    assert torch.allclose(pseudo_huber(a, b, c), 2 * c * (torch.sqrt(d2 + c ** 2) - c), rtol=1e-12)
    assert torch.allclose(smooth_l1(a, b, c), 2 * (torch.sqrt(d2 + c ** 2) - c), rtol=1e-12)


def test_huber_limits_mse_for_small_errors_and_linear_for_large():
    zero = torch.zeros(3)
    small, large = torch.tensor([1e-4, -3e-4, 2e-3]), torch.tensor([1000.0, -400.0, 2500.0])
    one, tenth = torch.tensor(1.0), torch.tensor(0.1)
    # fp32: the naive sqrt(d²+c²)-c would round these to 0.
    assert pseudo_huber(small, zero, one).tolist() == pytest.approx((small ** 2).tolist(), rel=1e-3)
    assert pseudo_huber(large, zero, tenth).tolist() == pytest.approx((0.2 * large.abs()).tolist(), rel=1e-3)
    assert smooth_l1(small, zero, tenth).tolist() == pytest.approx((small ** 2 / 0.1).tolist(), rel=1e-3)
    assert smooth_l1(large, zero, tenth).tolist() == pytest.approx((2 * large.abs()).tolist(), rel=1e-3)


@pytest.mark.parametrize("kind", ["Huber", "Smooth-L1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_each_sample_gets_the_c_of_its_timestep(kind, schedule):
    ac = tiny_scheduler().alphas_cumprod
    t = torch.tensor([0, 999])
    pred = torch.tensor([0.5, -2.0, 0.01, 3.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)  # same error, both samples
    fn = DiffusionLoss(kind, ac, snr_gamma=0.0, v_pred=False, device="cpu", c=0.1, schedule=schedule)
    _, per = fn(pred, torch.zeros_like(pred), t)
    for i, c in enumerate(huber_c(t, ac, 0.1, schedule).tolist()):
        d = pred[i].flatten().double()
        scale = 2 * c if kind == "Huber" else 2.0
        assert per[i].item() == pytest.approx((scale * (torch.sqrt(d ** 2 + c * c) - c)).mean().item(), rel=1e-5)
    _, direct = diffusion_loss(pred, torch.zeros_like(pred), kind=kind, timesteps=t, alphas_cumprod=ac,
                               snr_gamma=0.0, v_pred=False, c=0.1, schedule=schedule)
    assert torch.allclose(per, direct, rtol=1e-6)
    if schedule != "constant":
        assert per[0].item() != pytest.approx(per[1].item(), rel=1e-3)  # the schedule changes the loss


# ---- debiased estimation ----

def test_debiased_weights_by_hand():
    t = torch.tensor([0, 1, 2, 3])
    eps = debiased_weight(t, ALPHAS, v_pred=False)
    low = DEBIASED_SNR_RANGE[0]
    assert eps.tolist() == pytest.approx([1.0, 1 / 3, 1 / math.sqrt(99), 1 / math.sqrt(low)], rel=1e-5)
    assert debiased_weight(t, ALPHAS, v_pred=True).tolist() == pytest.approx([1 / 2, 1 / 10, 1 / 100, 1.0], rel=1e-5)
    # t=0 of the SD schedule has snr ≈ 1175: capped at 1000 as kohya's sd-scripts do.
    first = debiased_weight(torch.tensor([0]), tiny_scheduler().alphas_cumprod, v_pred=False)
    assert first.item() == pytest.approx(1 / math.sqrt(1000), rel=1e-5)


@pytest.mark.parametrize("v_pred", [False, True])
def test_debiased_combines_with_min_snr_as_a_product(v_pred):
    ac = tiny_scheduler().alphas_cumprod
    t = torch.tensor([0, 10, 500, 999])
    pred, target = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    raw = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    fn = DiffusionLoss("MSE", ac, snr_gamma=5.0, v_pred=v_pred, device="cpu", debiased=True)
    _, both = fn(pred, target, t)
    want = raw * min_snr_weight(t, ac, 5.0, v_pred) * debiased_weight(t, ac, v_pred)
    assert torch.allclose(both, want, rtol=1e-5)
    only, _ = DiffusionLoss("MSE", ac, snr_gamma=0.0, v_pred=v_pred, device="cpu", debiased=True)(pred, target, t)
    assert only.item() == pytest.approx((raw * debiased_weight(t, ac, v_pred)).mean().item(), rel=1e-5)


# ---- the schema ----

@pytest.mark.parametrize("field, value, over", [
    ("noise_offset_random_strength", True, {"noise_offset": 0.0}),
    ("ip_noise_gamma_random_strength", True, {"ip_noise_gamma": 0.0}),
    ("huber_c", 2.0, {"train_loss_function": "Huber", "huber_schedule": "snr"}),
    ("huber_c", 1.5, {"train_loss_function": "Smooth-L1", "huber_schedule": "exponential"}),
])
def test_bad_combinations_name_the_field(field, value, over):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"save_lora_name": "x", field: value, **over}).validate()
    assert err.value.key == field and err.value.value == value


def test_good_combinations_pass():
    TrainConfig.from_dict({"save_lora_name": "x", "train_loss_function": "Huber", "huber_schedule": "constant",
                           "huber_c": 2.0}).validate()
    TrainConfig.from_dict({"save_lora_name": "x", "huber_c": 5.0}).validate()  # MSE: c unused
    TrainConfig.from_dict({"save_lora_name": "x", "noise_offset": 0.1, "noise_offset_random_strength": True,
                           "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}).validate()


@pytest.mark.parametrize("given, canonical", [("huber", "Huber"), ("smooth_l1", "Smooth-L1"),
                                              ("Smooth-L1", "Smooth-L1"), ("Huber", "Huber")])
def test_loss_names_and_aliases(given, canonical):
    assert TrainConfig.from_dict({"train_loss_function": given}).train_loss_function == canonical


# ---- whole jobs ----

ALL_NOISE = {"noise_offset": 0.1, "noise_offset_random_strength": True, "multires_noise_iterations": 3,
             "ip_noise_gamma": 0.2, "ip_noise_gamma_random_strength": True}

def test_all_options_on_train_a_v_prediction_model(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora", family="sd2")
    cfg = quick_config(data, train_loss_function="Huber", huber_schedule="snr", train_debiased_estimation=True,
                       zero_terminal_snr=True, train_iterations=3, **ALL_NOISE).validate()
    before = host.bundle.noise_scheduler.alphas_cumprod.clone()
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 3
    assert math.isfinite(result.loss_first) and math.isfinite(result.loss_last) and result.loss_last > 0
    assert torch.equal(host.bundle.noise_scheduler.alphas_cumprod, before)  # the host's schedule untouched


def test_a_traintrain_preset_with_smooth_l1_still_loads_and_trains(tmp_path, logs):
    data = make_images(tmp_path / "data")
    preset = tmp_path / "old.json"
    settings = quick_config(data, train_iterations=2).to_dict()
    settings["train_loss_function"] = "Smooth-L1"
    for key in ("huber_c", "huber_schedule"):  # a TrainTrain file has no such keys
        settings.pop(key, None)
    preset.write_text(json.dumps(settings), encoding="utf-8")
    cfg = load_preset(preset)
    assert cfg.train_loss_function == "Smooth-L1" and cfg.huber_schedule == "snr" and cfg.huber_c == 0.1
    result = Trainer(cfg, MemoryHost(tmp_path / "lora"), device="cpu").run()
    assert result.status == "done" and math.isfinite(result.loss_last)


def _unet_inputs(bundle) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    bundle.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_addift_noises_through_the_training_schedule_and_noise_options(tmp_path, logs):
    """ZTSNR at t=999: both ADDifT inputs are the bare noise, which is multires (std 1 per sample)."""
    orig, targ = write_pair(tmp_path / "pair")
    host = MemoryHost(tmp_path / "out", family="sd2")
    seen = _unet_inputs(host.bundle)
    cfg = mode_job(tmp_path, "ADDifT", diff_original_image=str(orig), diff_target_image=str(targ),
                   train_iterations=2, train_min_timesteps=999, zero_terminal_snr=True,
                   multires_noise_iterations=3, train_loss_function="Huber", train_debiased_estimation=True)
    result = Trainer(cfg.validate(), host, device="cpu").run()
    assert result.status == "done" and math.isfinite(result.loss_last)
    base, net = seen[0], seen[1]  # step 1: the base prediction on the original, then the network's on the target
    assert torch.allclose(base, net, atol=1e-6)
    assert base.std(dim=(1, 2, 3)).tolist() == pytest.approx([1.0] * base.shape[0], rel=1e-4)
    assert torch.equal(host.bundle.noise_scheduler.alphas_cumprod, tiny_scheduler(True).alphas_cumprod)


def test_ileco_trains_with_the_loss_options(tmp_path, logs):
    host = MemoryHost(tmp_path / "out", family="sd2")
    cfg = mode_job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", train_iterations=2,
                   train_loss_function="Smooth-L1", huber_schedule="exponential", train_debiased_estimation=True,
                   zero_terminal_snr=True)
    result = Trainer(cfg.validate(), host, device="cpu").run()
    assert result.status == "done" and math.isfinite(result.loss_first) and math.isfinite(result.loss_last)
