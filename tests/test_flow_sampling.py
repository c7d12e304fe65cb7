"""Flow-matching math (trainer/families/flow.py): each timestep-sampling option against its
closed-form distribution, the noisy input and target identities, prediction types, the model
timestep convention, and option validation.

The reference CDFs are written here from the formulas, not from the module's code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.families import flow
from trainer.families.flow import FlowOptions

N = 20000
# Kolmogorov-Smirnov: the 99.9% critical value for n = 20000 is 1.95/sqrt(n) = 0.0138.
KS_OK = 0.014
KS_WRONG = 0.05
SHIFT = 3.1582

_erf = np.vectorize(math.erf)


def phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def logit(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x) - np.log1p(-x)


def draw(seed: int = 1234, n: int = N, **kw) -> np.ndarray:
    tokens = kw.pop("image_tokens", None)
    opts = FlowOptions(**kw)
    gen = torch.Generator().manual_seed(seed)
    sigma = flow.sample_sigmas(opts, n, image_tokens=tokens, generator=gen)
    assert sigma.shape == (n,) and sigma.dtype == torch.float32
    assert float(sigma.min()) >= 0.0 and float(sigma.max()) <= 1.0
    return sigma.double().numpy()


def ks_continuous(samples: np.ndarray, cdf) -> float:
    x = np.sort(samples)
    f = cdf(x)
    i = np.arange(1, len(x) + 1)
    return float(max((i / len(x) - f).max(), (f - (i - 1) / len(x)).max()))


def ks_on_grid(samples: np.ndarray, grid: np.ndarray, cdf_at_grid: np.ndarray) -> float:
    """KS distance of a discrete distribution, compared at its support points."""
    x = np.sort(samples)
    empirical = np.searchsorted(x, grid + 1e-6, side="right") / len(x)
    return float(np.abs(empirical - cdf_at_grid).max())


def shift_inverse(y: np.ndarray, s: float) -> np.ndarray:
    # y = s·x/(1 + (s − 1)·x)  ⇔  x = y/(s − (s − 1)·y)
    return y / (s - (s - 1.0) * y)


def test_uniform_is_uniform():
    s = draw(timestep_sampling="uniform")
    assert ks_continuous(s, lambda x: x) < KS_OK
    assert ks_continuous(s, lambda x: x ** 1.2) > KS_WRONG


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_matches_closed_form(scale):
    # σ = sigmoid(c·Z)  ⇒  P(σ ≤ x) = Φ(logit(x)/c)
    s = draw(timestep_sampling="sigmoid", sigmoid_scale=scale)
    assert ks_continuous(s, lambda x: phi(logit(x) / scale)) < KS_OK
    other = 1.0 if scale != 1.0 else 2.5
    assert ks_continuous(s, lambda x: phi(logit(x) / other)) > KS_WRONG


def test_shift_matches_closed_form():
    s = draw(timestep_sampling="shift", discrete_flow_shift=SHIFT)
    assert ks_continuous(s, lambda y: phi(logit(shift_inverse(y, SHIFT)))) < KS_OK
    assert ks_continuous(s, lambda y: phi(logit(y))) > KS_WRONG  # unshifted sigmoid is rejected
    assert np.median(s) > 0.7  # s·0.5/(1 + (s − 1)·0.5) = 0.7595: shifted towards noise


def test_shift_formula_on_fixed_sigmas():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(flow.shift_sigma(sigma, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.allclose(flow.shift_sigma(sigma, 1.0), sigma)
    assert flow.shift_sigma(torch.tensor(0.5), SHIFT).item() == pytest.approx(SHIFT / (1 + SHIFT), abs=1e-6)


def expected_mu(tokens: int) -> float:
    return 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)


def test_flux_mu_endpoints_and_linearity():
    assert flow.flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flow.flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flow.flux_mu(1024) == pytest.approx(0.63, abs=1e-12)  # 0.5 + 0.65·768/3840
    for a, b in [(256, 4096), (300, 1000), (1024, 2048)]:
        assert flow.flux_mu((a + b) // 2) == pytest.approx((flow.flux_mu(a) + flow.flux_mu(b)) / 2, abs=1e-12)
    assert flow.flux_image_tokens(128, 128) == 4096  # 1024² image: 128² latent, 2×2 packing
    assert flow.flux_image_tokens(32, 33) == 256
    # e^mu / (e^mu + 1/σ − 1) with mu = ln 2, σ = 0.5: 2/3
    assert flow.time_shift(math.log(2.0), torch.tensor(0.5)).item() == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_flux_shift_matches_closed_form(tokens):
    # y = e^mu/(e^mu + 1/t − 1)  ⇔  logit(t) = logit(y) − mu, with t = sigmoid(Z)
    s = draw(timestep_sampling="flux_shift", image_tokens=tokens)
    mu = expected_mu(tokens)
    assert ks_continuous(s, lambda y: phi(logit(y) - mu)) < KS_OK
    assert ks_continuous(s, lambda y: phi(logit(y) - mu - 0.3)) > KS_WRONG


def sigma_mode_cdf(u_cdf, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Support and CDF of "sigma" sampling: index i = floor(1000·u) picks σ_i = g((1000 − i)/1000),
    so P(σ ≤ g(j/1000)) = P(u ≥ 1 − j/1000) = 1 − F_u(1 − j/1000)."""
    j = np.arange(1, 1001)
    grid = shift * (j / 1000) / (1 + (shift - 1) * (j / 1000))
    return grid, 1.0 - u_cdf(1.0 - j / 1000)


@pytest.mark.parametrize("mean,std,shift", [(0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (-0.5, 1.0, SHIFT), (0.5, 2.0, SHIFT)])
def test_sigma_logit_normal_matches_closed_form(mean, std, shift):
    s = draw(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=mean,
             logit_std=std, discrete_flow_shift=shift)
    grid, cdf = sigma_mode_cdf(lambda u: phi((logit(u) - mean) / std), shift)
    assert ks_on_grid(s, grid, cdf) < KS_OK
    _, wrong = sigma_mode_cdf(lambda u: phi((logit(u) - mean - 1.0) / std), shift)  # mean 1 is not mean 0
    assert ks_on_grid(s, grid, wrong) > KS_WRONG
    _, wrong = sigma_mode_cdf(lambda u: phi((logit(u) - mean) / (std * 1.5)), shift)
    assert ks_on_grid(s, grid, wrong) > KS_WRONG


def test_sigma_reverses_the_density_as_the_schedule_does():
    # logit_mean 1 puts u near 1, and u near 1 indexes the low-noise end of the schedule.
    s = draw(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=1.0, discrete_flow_shift=1.0)
    assert np.median(s) == pytest.approx(1 - 1 / (1 + math.exp(-1.0)), abs=0.01)  # 1 − sigmoid(1) = 0.269


def mode_u_cdf(scale: float):
    """F_u for u = f(v) = 1 − v − s·(cos²(πv/2) − 1 + v), v ~ U(0,1), f decreasing:
    P(u ≤ a) = 1 − f⁻¹(a), f⁻¹ by bisection."""
    def f(v):
        return 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)

    def cdf(a):
        lo, hi = np.zeros_like(a), np.ones_like(a)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > a
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1.0 - (lo + hi) / 2
    return cdf


@pytest.mark.parametrize("scale", [1.29, -0.8])
def test_sigma_mode_matches_closed_form(scale):
    s = draw(timestep_sampling="sigma", weighting_scheme="mode", mode_scale=scale, discrete_flow_shift=SHIFT)
    grid, cdf = sigma_mode_cdf(mode_u_cdf(scale), SHIFT)
    assert ks_on_grid(s, grid, cdf) < KS_OK
    _, uniform = sigma_mode_cdf(lambda u: u, SHIFT)
    assert ks_on_grid(s, grid, uniform) > KS_WRONG


@pytest.mark.parametrize("scheme", ["uniform", "none", "cosmap", "sigma_sqrt"])
def test_sigma_uniform_density(scheme):
    s = draw(timestep_sampling="sigma", weighting_scheme=scheme, discrete_flow_shift=SHIFT)
    grid, cdf = sigma_mode_cdf(lambda u: u, SHIFT)
    assert ks_on_grid(s, grid, cdf) < KS_OK
    at = np.clip(np.searchsorted(grid, s), 1, len(grid) - 1)
    nearest = np.minimum(np.abs(s - grid[at - 1]), np.abs(s - grid[at]))
    assert nearest.max() < 1e-6  # only schedule values


def test_discrete_schedule_equals_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    for shift in (1.0, SHIFT):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        u = torch.linspace(0, 0.9999, 4001)
        expected = sched.sigmas[(u * 1000).long()]
        assert torch.allclose(flow.discrete_schedule_sigma(u, shift), expected, atol=1e-6)
        assert torch.allclose(flow.train_timesteps(expected), sched.timesteps[(u * 1000).long()], atol=1e-3)


def test_draws_follow_the_generator():
    opts = FlowOptions(timestep_sampling="shift")
    a = flow.sample_sigmas(opts, 8, generator=torch.Generator().manual_seed(7), device="cpu")
    b = flow.sample_sigmas(opts, 8, generator=torch.Generator().manual_seed(7), device="cpu")
    c = flow.sample_sigmas(opts, 8, generator=torch.Generator().manual_seed(8), device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noisy_input_and_target_identities():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    assert torch.equal(flow.noisy_input(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.noisy_input(x0, noise, torch.ones(3)), noise)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    mixed = flow.noisy_input(x0, noise, sigma)
    assert torch.allclose(mixed[1], (x0[1] + noise[1]) / 2, atol=1e-6)
    # the target is the velocity d(noisy)/dσ, per sample
    _, velocity = torch.autograd.functional.jvp(lambda s: flow.noisy_input(x0, noise, s), sigma, torch.ones(3))
    assert torch.allclose(velocity, flow.flow_target(x0, noise), atol=1e-6)
    assert flow.noisy_input(x0.half(), noise.half(), sigma).dtype == torch.float16


def test_prediction_types_on_hand_values():
    pred, noisy = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 3.0)
    sigma = torch.tensor([0.25, 0.5])
    out, w = flow.apply_prediction_type(FlowOptions(model_prediction_type="raw"), pred, noisy, sigma)
    assert torch.equal(out, pred) and torch.equal(w, torch.ones(2))
    out, w = flow.apply_prediction_type(FlowOptions(model_prediction_type="additive"), pred, noisy, sigma)
    assert torch.equal(out, torch.full_like(pred, 5.0)) and torch.equal(w, torch.ones(2))
    expected = {"uniform": [1.0, 1.0], "logit_normal": [1.0, 1.0], "sigma_sqrt": [16.0, 4.0],
                "cosmap": [2 / (math.pi * 0.625), 2 / (math.pi * 0.5)]}  # 1 − 2σ + 2σ²
    for scheme, weights in expected.items():
        opts = FlowOptions(model_prediction_type="sigma_scaled", weighting_scheme=scheme)
        out, w = flow.apply_prediction_type(opts, pred, noisy, sigma)
        assert torch.allclose(out[0], torch.full((1, 2, 2), 2.5)) and torch.allclose(out[1], torch.full((1, 2, 2), 2.0))
        assert torch.allclose(w, torch.tensor(weights), atol=1e-6), scheme


def test_sigma_scaled_of_the_velocity_is_x0():
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    sigma = torch.tensor([0.05, 0.3, 0.7, 1.0])
    noisy = flow.noisy_input(x0, noise, sigma)
    velocity = flow.flow_target(x0, noise)
    out, _ = flow.apply_prediction_type(FlowOptions(), velocity, noisy, sigma)
    assert torch.allclose(out, x0, atol=1e-5)
    out, w = flow.sd3_prediction(FlowOptions(weighting_scheme="sigma_sqrt"), velocity, noisy, sigma)
    assert torch.allclose(out, flow.sd3_target(x0, noise), atol=1e-5)
    assert torch.allclose(w, sigma ** -2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_sigmas_match_closed_form(shift):
    opts = FlowOptions(weighting_scheme="logit_normal", logit_mean=0.3)
    s = flow.sd3_sample_sigmas(opts, N, training_shift=shift, generator=torch.Generator().manual_seed(5))
    # t = max(1, floor(1000·g(u))), σ = t/1000  ⇒  P(σ ≤ j/1000) = F_u(g⁻¹((j + 1)/1000)), j ≥ 1
    j = np.arange(1, 1000)
    cdf = phi(logit(shift_inverse((j + 1) / 1000, shift)) - 0.3)
    assert ks_on_grid(s.double().numpy(), j / 1000, cdf) < KS_OK
    assert float(s.min()) >= 0.001
    wrong = phi(logit(shift_inverse((j + 1) / 1000, 1.0 if shift != 1.0 else 3.0)) - 0.3)
    assert ks_on_grid(s.double().numpy(), j / 1000, wrong) > KS_WRONG


def test_sd3_sigmas_never_zero():
    # With a uniform density 1 in 1000 draws has floor(1000·u) = 0; it is moved to σ = 0.001.
    s = flow.sd3_sample_sigmas(FlowOptions(), N, generator=torch.Generator().manual_seed(6))
    assert float(s.min()) == pytest.approx(0.001)
    assert float((s < 0.0015).double().mean()) == pytest.approx(0.002, abs=0.0015)
    assert float(s.max()) <= 1.0


def test_models_embed_sigma_times_1000():
    """FLUX gets σ and scales it (and guidance) by 1000 inside; SD3 gets σ·1000: both
    time embeddings see train_timesteps(σ)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    sigma = torch.tensor([0.25, 0.8])
    seen = []
    hook = lambda module, args: seen.append(args)  # noqa: E731
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    flux.time_text_embed.register_forward_pre_hook(hook)
    flux(hidden_states=torch.randn(2, 4, 4), encoder_hidden_states=torch.randn(2, 3, 16),
         pooled_projections=torch.randn(2, 8), timestep=flow.flux_model_timestep(sigma),
         img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.ones(2))
    assert torch.allclose(seen[0][0], flow.train_timesteps(sigma))
    assert torch.allclose(seen[0][1], torch.full((2,), 1000.0))
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                pos_embed_max_size=16)
    sd3.time_text_embed.register_forward_pre_hook(hook)
    sd3(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 3, 16),
        pooled_projections=torch.randn(2, 8), timestep=flow.sd3_model_timestep(sigma))
    assert torch.allclose(seen[1][0], flow.train_timesteps(sigma))


@pytest.mark.parametrize("key,value", [
    ("timestep_sampling", "foo"), ("timestep_sampling", "qinglong"), ("weighting_scheme", "logit"),
    ("model_prediction_type", "eps"), ("sigmoid_scale", 0.0), ("sigmoid_scale", "1"),
    ("discrete_flow_shift", -3.0), ("discrete_flow_shift", float("nan")), ("logit_std", 0.0),
    ("logit_mean", float("inf")), ("logit_mean", True), ("mode_scale", 1.76), ("mode_scale", -1.01),
])
def test_bad_option_values_name_the_key(key, value):
    with pytest.raises(ValueError) as err:
        FlowOptions(**{key: value})
    assert key in str(err.value) and repr(value) in str(err.value)


def test_edges_of_valid_ranges_and_bad_call_arguments():
    FlowOptions(mode_scale=1.75, logit_mean=-2, sigmoid_scale=3)  # ints are accepted
    FlowOptions(mode_scale=-1.0)
    opts = FlowOptions(timestep_sampling="flux_shift")
    with pytest.raises(ValueError, match="image_tokens.*None"):
        flow.sample_sigmas(opts, 2)
    with pytest.raises(ValueError, match="batch.*0"):
        flow.sample_sigmas(opts, 0, image_tokens=256)
    with pytest.raises(ValueError, match="training_shift.*0"):
        flow.sd3_sample_sigmas(opts, 2, training_shift=0)
    opts.model_prediction_type = "eps"  # mutated after validation
    with pytest.raises(ValueError, match="model_prediction_type.*'eps'"):
        flow.apply_prediction_type(opts, torch.ones(1, 1), torch.ones(1, 1), torch.ones(1))
