"""Losses: timesteps, offset noise, targets, min-SNR weights and masked losses against hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.config.schema import LOSSES
from trainer.training.losses import (
    LOSS_KINDS,
    DiffusionLoss,
    Ema,
    diffusion_loss,
    min_snr_weight,
    noise_like,
    sample_timesteps,
    snr,
    training_target,
)
from trainer.config.params import ConfigError

# snr = ᾱ/(1-ᾱ) = 1, 9, 99 and 0 (a zero-terminal-SNR last step).
ALPHAS = torch.tensor([0.5, 0.9, 0.99, 0.0])
FP32 = 1e-5  # relative tolerance: 0.9 and 0.99 are not exact in fp32


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loss_names_match_the_schema():
    assert LOSS_KINDS == LOSSES


def test_timesteps_cover_the_range_and_nothing_else():
    t = sample_timesteps(2000, 100, 110, same_in_batch=False, generator=gen())
    assert t.dtype == torch.long and t.shape == (2000,)
    assert set(t.tolist()) == set(range(100, 110))


def test_timesteps_same_in_batch_and_deterministic():
    t = sample_timesteps(8, 0, 1000, same_in_batch=True, generator=gen(1))
    assert t.shape == (8,) and len(set(t.tolist())) == 1
    a = sample_timesteps(64, 0, 1000, same_in_batch=False, generator=gen(3))
    b = sample_timesteps(64, 0, 1000, same_in_batch=False, generator=gen(3))
    c = sample_timesteps(64, 0, 1000, same_in_batch=False, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and len(set(a.tolist())) > 1


@pytest.mark.parametrize("t_min, t_max", [(500, 500), (600, 500), (-1, 10)])
def test_timestep_range_errors(t_min, t_max):
    with pytest.raises(ConfigError) as err:
        sample_timesteps(2, t_min, t_max, same_in_batch=False, generator=None)
    assert err.value.key == "train_min_timesteps"


def test_noise_is_deterministic_and_shaped_like_the_latents():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    a = noise_like(latents, offset=0.0, generator=gen(5))
    assert a.shape == latents.shape and a.dtype == torch.bfloat16
    assert torch.equal(a, noise_like(latents, offset=0.0, generator=gen(5)))
    assert not torch.equal(a, noise_like(latents, offset=0.0, generator=gen(6)))


def test_offset_noise_adds_a_per_sample_per_channel_constant():
    latents = torch.zeros(64, 4, 32, 32)
    plain = noise_like(latents, offset=0.0, generator=gen(7))
    offset = noise_like(latents, offset=0.3, generator=gen(7))
    extra = offset - plain  # same generator state, so the Gaussian part cancels
    assert torch.allclose(extra, extra[:, :, :1, :1].expand_as(extra), atol=1e-6)
    assert extra[:, :, 0, 0].std().item() == pytest.approx(0.3, abs=0.04)
    assert not torch.allclose(extra[:, 0, 0, 0], extra[:, 1, 0, 0])  # per channel, not per sample
    # Statistically: per-channel means over H,W spread with std ≈ offset (plain noise: ≈ 1/32).
    assert offset.mean(dim=(2, 3)).std().item() == pytest.approx(math.sqrt(0.3 ** 2 + 1 / 1024), abs=0.04)
    assert plain.mean(dim=(2, 3)).std().item() < 0.05


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="v_prediction")


def test_targets_epsilon_and_v_prediction():
    sched = _scheduler()
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen(8)), torch.randn(3, 4, 8, 8, generator=gen(9))
    t = torch.tensor([0, 400, 999])
    assert training_target(sched, x0, eps, t, v_pred=False) is eps
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(3, 1, 1, 1)
    expected = abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()
    assert torch.allclose(training_target(sched, x0, eps, t, v_pred=True).double(), expected, atol=1e-5)


def test_snr_values():
    assert snr(ALPHAS, torch.tensor([0, 1, 2, 3])).tolist() == pytest.approx([1.0, 9.0, 99.0, 0.0], rel=FP32)


def test_min_snr_weights_by_hand():
    t = torch.tensor([0, 1, 2, 3])
    eps = min_snr_weight(t, ALPHAS, 5.0, v_pred=False)
    assert eps.tolist() == pytest.approx([1.0, 5 / 9, 5 / 99, 1.0], rel=FP32)  # snr 0: the limit 1, not NaN
    v = min_snr_weight(t, ALPHAS, 5.0, v_pred=True)
    assert v.tolist() == pytest.approx([1 / 2, 5 / 10, 5 / 100, 0.0], rel=FP32)
    assert min_snr_weight(t, ALPHAS, 0.0, v_pred=False).tolist() == [1.0] * 4
    assert min_snr_weight(t, ALPHAS, 0.0, v_pred=True).tolist() == [1.0] * 4


# Two samples of one element each per position: differences (pred - target) per sample.
DIFFS = torch.tensor([[0.5, 2.0, -3.0, 0.1], [1.0, -0.2, 0.0, 4.0]])


def _hand(kind: str, d: float, c: float = 0.1) -> float:
    """diffusion_loss's defaults for the Huber kinds: the constant schedule, c = 0.1."""
    if kind == "MSE":
        return d * d
    if kind == "L1":
        return abs(d)
    if kind == "Huber":
        return 2 * c * (math.sqrt(d * d + c * c) - c)
    return 2 * (math.sqrt(d * d + c * c) - c)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_loss_values_by_hand(kind):
    pred = DIFFS.view(2, 1, 2, 2).clone().requires_grad_(True)
    target = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([1, 2])
    per_hand = [sum(_hand(kind, d) for d in row) / 4 for row in DIFFS.tolist()]
    loss, per = diffusion_loss(pred, target, kind=kind, timesteps=t, alphas_cumprod=ALPHAS,
                               snr_gamma=0.0, v_pred=False)
    assert per.tolist() == pytest.approx(per_hand, rel=FP32)
    assert loss.item() == pytest.approx(sum(per_hand) / 2, rel=FP32)
    assert loss.requires_grad and not per.requires_grad
    weighted, per_w = diffusion_loss(pred, target, kind=kind, timesteps=t, alphas_cumprod=ALPHAS,
                                     snr_gamma=5.0, v_pred=False)
    assert per_w.tolist() == pytest.approx([per_hand[0] * 5 / 9, per_hand[1] * 5 / 99], rel=FP32)
    assert weighted.item() == pytest.approx((per_hand[0] * 5 / 9 + per_hand[1] * 5 / 99) / 2, rel=FP32)


def test_loss_is_computed_in_fp32():
    pred = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16)  # 300² overflows nothing in fp32
    loss, _ = diffusion_loss(pred, torch.zeros_like(pred), kind="MSE", timesteps=torch.tensor([0]),
                             alphas_cumprod=ALPHAS, snr_gamma=0.0, v_pred=False)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(90000.0)


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (2, 4, 4), (4, 4)])
def test_masked_loss_ignores_masked_out_pixels(shape):
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0  # keep the top half
    target = torch.zeros(2, 4, 4, 4)
    pred = target.clone()
    pred[:, :, 2:] = 100.0  # wrong only where the mask is 0
    pred[:, :, 0, 0] = 2.0  # and by 2 at one kept pixel in every channel
    m = mask.expand(*shape) if len(shape) == 2 else mask.expand(shape[0], *shape[1:])
    _, per = diffusion_loss(pred, target, kind="MSE", timesteps=torch.tensor([0, 1]),
                            alphas_cumprod=ALPHAS, snr_gamma=0.0, v_pred=False, mask=m)
    assert per.tolist() == pytest.approx([4.0 / 8, 4.0 / 8])  # one of 8 kept pixels, error 2² each
    unmasked, _ = diffusion_loss(pred, target, kind="MSE", timesteps=torch.tensor([0, 1]),
                                 alphas_cumprod=ALPHAS, snr_gamma=0.0, v_pred=False)
    assert unmasked.item() > 1000


def test_all_zero_mask_gives_zero_not_nan():
    pred = torch.ones(2, 4, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 0
    _, per = diffusion_loss(pred, torch.zeros_like(pred), kind="L1", timesteps=torch.tensor([0, 0]),
                            alphas_cumprod=ALPHAS, snr_gamma=0.0, v_pred=False, mask=mask)
    assert per.tolist() == [1.0, 0.0]


def test_mask_of_the_wrong_size_is_refused():
    pred = torch.ones(1, 4, 4, 4)
    with pytest.raises(ValueError, match="mask"):
        diffusion_loss(pred, pred, kind="MSE", timesteps=torch.tensor([0]), alphas_cumprod=ALPHAS,
                       snr_gamma=0.0, v_pred=False, mask=torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("v_pred", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_precomputed_loss_matches_the_function(kind, v_pred, gamma):
    ac = _scheduler().alphas_cumprod
    pred, target = torch.randn(4, 4, 8, 8, generator=gen(10)), torch.randn(4, 4, 8, 8, generator=gen(11))
    t = torch.tensor([0, 10, 500, 999])
    mask = (torch.rand(4, 1, 8, 8, generator=gen(12)) > 0.5).float()
    fn = DiffusionLoss(kind, ac, snr_gamma=gamma, v_pred=v_pred, device="cpu")
    got, got_per = fn(pred, target, t, mask)
    want, want_per = diffusion_loss(pred, target, kind=kind, timesteps=t, alphas_cumprod=ac,
                                    snr_gamma=gamma, v_pred=v_pred, mask=mask)
    assert torch.allclose(got_per, want_per, rtol=1e-6) and got.item() == pytest.approx(want.item())


def test_unknown_loss_kind():
    with pytest.raises(ConfigError) as err:
        DiffusionLoss("Charbonnier", ALPHAS, snr_gamma=0.0, v_pred=False, device="cpu")
    assert err.value.key == "train_loss_function" and err.value.value == "Charbonnier"


def test_ema_starts_at_the_first_loss():
    ema = Ema()
    assert ema.value is None
    assert [ema.update(x) for x in (1.0, 2.0, 3.0)] == pytest.approx([1.0, 1.1, 1.29])
    assert Ema(alpha=0.5).update(torch.tensor(4.0)) == 4.0
