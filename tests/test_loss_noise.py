"""Loss shaping, the noise side: offset, multires and input-perturbation noise, what the U-Net
sees and is trained toward in denoising_loss, the data-parallel draw order, and zero-terminal SNR."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.families.bundle import ModelBundle
from trainer.config.schema import TrainConfig
from trainer.training.events import StopFlag
from trainer.training.losses import DEBIASED_SNR_RANGE, DiffusionLoss
from trainer.modes.base import StepContext, denoising_loss
from trainer.training.noise import input_perturbation, noise_like
from trainer.families.textenc import Cond

from tests.tiny import tiny_scheduler


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

# ---- noise ----

def test_random_offset_strength_is_a_per_sample_factor():
    latents = torch.zeros(16, 4, 8, 8)
    plain = noise_like(latents, generator=gen(3))
    fixed = noise_like(latents, offset=0.2, generator=gen(3))
    scaled = noise_like(latents, offset=0.2, offset_random=True, generator=gen(3))
    ratio = (scaled - plain) / (fixed - plain)  # same draws: only the U[0,1) factor differs
    per_sample = ratio[:, :1, :1, :1]
    assert torch.allclose(ratio, per_sample.expand_as(ratio), atol=1e-4)
    assert bool(((per_sample >= 0) & (per_sample < 1)).all()) and per_sample.std() > 0.1


def _pyramid_by_hand(shape, iterations, discount, seed):
    g = gen(seed)
    noise = torch.randn(shape, generator=g)
    h, w = shape[2:]
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=g).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        noise = noise + F.interpolate(torch.randn(shape[0], shape[1], hn, wn, generator=g), size=(h, w),
                                      mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def test_multires_noise_equals_the_pyramid_and_has_unit_std_per_sample():
    latents = torch.zeros(3, 4, 32, 24)
    got = noise_like(latents, multires_iterations=4, multires_discount=0.3, generator=gen(4))
    assert torch.allclose(got, _pyramid_by_hand(latents.shape, 4, 0.3, 4), atol=1e-5)
    assert got.std(dim=(1, 2, 3)).tolist() == pytest.approx([1.0] * 3, rel=1e-5)
    # Strong coarse levels: per-channel means spread far more than plain noise's (≈ 1/sqrt(H·W)).
    strong = noise_like(latents, multires_iterations=6, multires_discount=0.8, generator=gen(4))
    plain = noise_like(latents, generator=gen(4))
    assert strong.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()


def test_multires_stops_once_a_level_is_one_cell():
    latents = torch.zeros(2, 4, 8, 8)
    g = gen(5)  # replay the draws to find the level that reaches one cell
    torch.randn(latents.shape, generator=g)
    sizes = []
    while not sizes or sizes[-1] > 1:
        r = 2 + 2 * torch.rand((), generator=g).item()
        sizes.append(max(1, int(8 / r ** len(sizes))))
        torch.randn(2, 4, sizes[-1], sizes[-1], generator=g)
    assert len(sizes) < 5  # 8 cells: r >= 2 reaches 1 within a few levels
    many = noise_like(latents, multires_iterations=20, multires_discount=0.5, generator=gen(5))
    exact = noise_like(latents, multires_iterations=len(sizes), multires_discount=0.5, generator=gen(5))
    assert torch.equal(many, exact)  # no level past the 1-cell one
    assert torch.allclose(many, _pyramid_by_hand(latents.shape, len(sizes), 0.5, 5), atol=1e-5)


def test_input_perturbation_strengths():
    x = torch.zeros(8, 4, 4, 4)
    assert torch.equal(input_perturbation(x, 0.0, generator=gen(6)), x)
    fixed = input_perturbation(x, 0.5, generator=gen(6))
    assert torch.allclose(fixed, 0.5 * torch.randn(x.shape, generator=gen(6)))
    scaled = input_perturbation(x, 0.5, random_strength=True, generator=gen(6))
    factor = (scaled / fixed)[:, :1, :1, :1]
    assert torch.allclose(scaled / fixed, factor.expand_as(scaled), atol=1e-4)
    assert bool(((factor >= 0) & (factor < 1)).all()) and factor.std() > 0.1


# ---- denoising_loss: what the U-Net sees and what it is trained toward ----

class RecordingUnet(torch.nn.Module):
    """Returns zeros and keeps its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, hidden, return_dict=False, **kwargs):
        self.inputs.append((x.detach().clone(), t.clone()))
        return (torch.zeros_like(x),)


def _ctx(v_pred: bool = False, shard: slice | None = None, seed: int = 9, **over) -> StepContext:
    cfg = TrainConfig(**{"train_snr_gamma": 0.0, "noise_offset": 0.0, **over})
    bundle = ModelBundle(family="sd1", unet=RecordingUnet(), vae=None, text_encoders=[None], tokenizers=[None],
                         noise_scheduler=tiny_scheduler(v_pred), v_pred=v_pred)
    reports: list[str] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def loss(pred, target, timesteps, mask):
        seen.append((pred, target))
        return F.mse_loss(pred, target), None

    ctx = StepContext(cfg=cfg, bundle=bundle, network=None, device=torch.device("cpu"), dtype=torch.float32,
                      seed=seed, generator=gen(seed), stop=StopFlag(), encode=None, encode_grad=None,
                      autocast=lambda: torch.autocast("cpu", enabled=False),
                      report=lambda m, d, t: reports.append(m), shard=shard)
    ctx.state.update(loss=loss, seen=seen, reports=reports)
    return ctx


def _latents(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=gen(11))


@pytest.mark.parametrize("v_pred", [False, True])
@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_noises_the_input_but_not_the_target(v_pred, random_strength):
    ctx = _ctx(v_pred, ip_noise_gamma=0.3, ip_noise_gamma_random_strength=random_strength)
    x0, cond = _latents(), Cond(torch.zeros(4, 3, 8))
    denoising_loss(ctx, x0, cond)
    g = gen(9)  # replay the pass's draws: noise, timesteps, perturbation (and its strengths)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    extra = 0.3 * torch.randn(x0.shape, generator=g)
    if random_strength:
        extra = extra * torch.rand(4, 1, 1, 1, generator=g)
    sched = tiny_scheduler(v_pred)
    seen_x, seen_t = ctx.bundle.unet.inputs[0]
    assert torch.equal(seen_t, t)
    assert torch.allclose(seen_x, sched.add_noise(x0, noise + extra, t), atol=1e-6)
    target = ctx.state["seen"][0][1]
    want = sched.get_velocity(x0, noise, t) if v_pred else noise
    assert torch.allclose(target, want, atol=1e-6)
    assert not torch.allclose(seen_x, sched.add_noise(x0, noise, t), atol=1e-3)


ALL_NOISE = {"noise_offset": 0.1, "noise_offset_random_strength": True, "multires_noise_iterations": 3,
             "ip_noise_gamma": 0.2, "ip_noise_gamma_random_strength": True}


def test_every_draw_precedes_the_shard():
    """Two ranks with half the rows each see exactly the rows of one process's batch."""
    x0, cond = _latents(), Cond(torch.randn(4, 3, 8, generator=gen(12)))
    whole = _ctx(**ALL_NOISE)
    denoising_loss(whole, x0, cond)
    for rows in (slice(0, 2), slice(2, 4)):
        rank = _ctx(shard=rows, **ALL_NOISE)
        denoising_loss(rank, x0, cond)
        assert torch.equal(rank.bundle.unet.inputs[0][0], whole.bundle.unet.inputs[0][0][rows])
        assert torch.equal(rank.state["seen"][0][1], whole.state["seen"][0][1][rows])


def test_same_seed_same_step_other_seed_other_step():
    x0, cond = _latents(), Cond(torch.zeros(4, 3, 8))
    runs = []
    for seed in (5, 5, 6):
        ctx = _ctx(seed=seed, **ALL_NOISE)
        denoising_loss(ctx, x0, cond)
        runs.append(ctx.bundle.unet.inputs[0][0])
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


# ---- zero-terminal SNR ----

def test_zero_terminal_snr_is_a_rescaled_copy():
    bundle = _ctx(v_pred=True).bundle
    original = bundle.noise_scheduler
    before = original.alphas_cumprod.clone()
    rescaled = bundle.training_scheduler(zero_terminal_snr=True)
    assert bundle.training_scheduler(zero_terminal_snr=False) is original
    assert rescaled is not original and torch.equal(original.alphas_cumprod, before)
    ac = rescaled.alphas_cumprod.double()
    assert ac[-1].item() == 0.0 and ac[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    # Algorithm 1: sqrt(ᾱ) shifted so the last is 0, scaled so the first is kept.
    s = before.double().sqrt()
    want = (s - s[-1]) * s[0] / (s[0] - s[-1])
    assert torch.allclose(ac.sqrt(), want, atol=1e-5)
    assert bool((rescaled.betas >= 0).all() and (rescaled.betas <= 1).all())


@pytest.mark.parametrize("v_pred", [False, True])
def test_zero_terminal_snr_weights_stay_finite(v_pred):
    ac = _ctx().bundle.training_scheduler(zero_terminal_snr=True).alphas_cumprod
    for kind in ("MSE", "Huber"):
        fn = DiffusionLoss(kind, ac, snr_gamma=5.0, v_pred=v_pred, device="cpu", debiased=True, schedule="snr")
        assert bool(torch.isfinite(fn.weights).all()) and bool((fn.weights >= 0).all())
        assert fn.weights.max() <= 1 / math.sqrt(DEBIASED_SNR_RANGE[0]) + 1e-3
        # The last step: epsilon keeps min-SNR's limit 1 times the capped 1/sqrt(snr); v gets 0 from min-SNR.
        last = fn.weights[-1].item()
        assert last == (0.0 if v_pred else pytest.approx(1 / math.sqrt(DEBIASED_SNR_RANGE[0]), rel=1e-4))
        if fn.c is not None:
            assert bool(torch.isfinite(fn.c).all()) and fn.c[-1].item() == pytest.approx(0.1)


def test_zero_terminal_snr_trains_on_pure_noise_at_the_last_step(caplog):
    ctx = _ctx(v_pred=True, zero_terminal_snr=True, train_min_timesteps=999)
    x0 = _latents()
    denoising_loss(ctx, x0, Cond(torch.zeros(4, 3, 8)))
    noise = torch.randn(x0.shape, generator=gen(9))
    seen_x, _ = ctx.bundle.unet.inputs[0]
    assert torch.allclose(seen_x, noise, atol=1e-6)  # ᾱ_T = 0: no signal left
    assert torch.allclose(ctx.state["seen"][0][1], -x0, atol=1e-6)  # v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0 = -x0
    assert ctx.state["reports"] == []  # a v-prediction model: no warning
    assert tiny_scheduler(True).alphas_cumprod[-1] > 0 and ctx.bundle.noise_scheduler.alphas_cumprod[-1] > 0
    eps = _ctx(v_pred=False, zero_terminal_snr=True)
    with caplog.at_level(logging.WARNING):
        denoising_loss(eps, x0, Cond(torch.zeros(4, 3, 8)))
    assert any("v-prediction" in m for m in eps.state["reports"])
    assert any("v-prediction" in r.getMessage() for r in caplog.records)
