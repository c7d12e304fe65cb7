"""Rectified-flow (flow-matching) training math for FLUX.1 and, later, SD3.

Conventions (the same as sd-scripts' FLUX and SD3 trainers):
- sigma (σ) is the noise level in [0, 1]: noisy = (1 − σ)·x0 + σ·noise, so σ = 0 is the clean
  latent and σ = 1 pure noise. The velocity target is noise − x0 = d(noisy)/dσ.
- The schedule's "timestep" t is σ·1000 (`train_timesteps`), as FlowMatchEulerDiscreteScheduler
  numbers it (1000 training steps).
- FLUX (BFL `Flux` and diffusers' FluxTransformer2DModel) takes σ itself as its timestep and
  multiplies by 1000 inside before the sinusoidal embedding (`flux_model_timestep`); the
  guidance value is scaled the same way inside the model. SD3's transformer takes t = σ·1000
  (`sd3_model_timestep`). Both embeddings therefore see σ·1000.

Every draw uses the given generator, in fp32 on the generator's device (CPU when none), and is
then moved to `device`, so a seed gives the same σ on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
# FLUX's resolution-dependent shift: mu goes linearly from BASE_SHIFT at 256 image tokens to
# MAX_SHIFT at 4096 (a 1024² image: 128² latent, packed 2×2 into 64² tokens).
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_TOKENS, MAX_TOKENS = 256, 4096
# The "mode" density map u ↦ 1 − u − s·(cos²(πu/2) − 1 + u) is a decreasing bijection of
# [0, 1] only for s in [−1, 2/(π − 2)] (SD3 paper, section 3.1).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def _bad(key: str, expected: str, value: object) -> ValueError:
    return ValueError(f"{key}: expected {expected}, got {value!r}")


def _number(key: str, value: object, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _bad(key, "a positive finite number" if positive else "a finite number", value)
    return float(value)


@dataclass
class FlowOptions:
    """Flow-matching options, named and defaulted as sd-scripts' FLUX arguments
    (except discrete_flow_shift, which defaults to the 3.1582 sd-scripts recommends)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.1582
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "sigma_scaled"

    def __post_init__(self) -> None:
        for key, choices in (("timestep_sampling", TIMESTEP_SAMPLINGS),
                             ("weighting_scheme", WEIGHTING_SCHEMES),
                             ("model_prediction_type", PREDICTION_TYPES)):
            if getattr(self, key) not in choices:
                raise _bad(key, f"one of {choices}", getattr(self, key))
        self.sigmoid_scale = _number("sigmoid_scale", self.sigmoid_scale, positive=True)
        self.discrete_flow_shift = _number("discrete_flow_shift", self.discrete_flow_shift, positive=True)
        self.logit_mean = _number("logit_mean", self.logit_mean)
        self.logit_std = _number("logit_std", self.logit_std, positive=True)
        self.mode_scale = _number("mode_scale", self.mode_scale)
        lo, hi = MODE_SCALE_RANGE
        if not lo <= self.mode_scale <= hi:
            raise _bad("mode_scale", f"a number in [{lo}, {hi:.4f}]", self.mode_scale)


# ---- schedule formulas ----------------------------------------------------------------------

def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Discrete-flow shift σ' = s·σ / (1 + (s − 1)·σ); s > 1 moves σ towards noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux_image_tokens(latent_height: int, latent_width: int) -> int:
    """Image tokens FLUX sees for a latent: 2×2 latent patches are packed into one token."""
    return (latent_height // 2) * (latent_width // 2)


def flux_mu(image_tokens: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu of FLUX's resolution-dependent shift: linear in the token count through
    (256, base_shift) and (4096, max_shift), extrapolated outside as in the reference."""
    slope = (max_shift - base_shift) / (MAX_TOKENS - BASE_TOKENS)
    return base_shift + slope * (image_tokens - BASE_TOKENS)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """FLUX's time shift e^mu / (e^mu + 1/σ − 1), i.e. `shift_sigma` with s = e^mu."""
    return shift_sigma(sigma, math.exp(mu))


def discrete_schedule_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ that sd-scripts' "sigma" sampling picks for a density draw u in [0, 1].

    The schedule (FlowMatchEulerDiscreteScheduler, 1000 steps) lists σ_i = shift((1000 − i)/1000)
    from high noise to low; u indexes it at floor(u·1000), so u near 0 gives σ near 1. An index
    of 1000 (u rounded to 1 in fp32) is clamped to the last entry.
    """
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return shift_sigma((NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS, shift)


def train_timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """The schedule's timestep t = σ·1000 (what the reference logs and its Huber schedule reads)."""
    return sigma * NUM_TRAIN_TIMESTEPS


def flux_model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The `timestep` argument for FLUX: σ in [0, 1]; the model scales it by 1000 itself."""
    return sigma


def sd3_model_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The `timestep` argument for SD3's transformer: t = σ·1000, used unscaled by the model."""
    return train_timesteps(sigma)


# ---- sampling -------------------------------------------------------------------------------

def _where(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def density_u(opts: FlowOptions, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """u in [0, 1] from the weighting scheme's density (SD3 paper 3.1): logit-normal
    sigmoid(N(logit_mean, logit_std)), mode 1 − v − s·(cos²(πv/2) − 1 + v) for v ~ U(0,1),
    otherwise U(0,1) (uniform, none, and the loss-weighting schemes sigma_sqrt and cosmap)."""
    where = _where(generator)
    if opts.weighting_scheme == "logit_normal":
        z = torch.randn(batch, generator=generator, device=where, dtype=torch.float32)
        return torch.sigmoid(opts.logit_mean + opts.logit_std * z)
    v = torch.rand(batch, generator=generator, device=where, dtype=torch.float32)
    if opts.weighting_scheme == "mode":
        s = opts.mode_scale
        return (1.0 - v - s * (torch.cos(math.pi * v / 2.0) ** 2 - 1.0 + v)).clamp(0.0, 1.0)
    return v


def _sigmoid_draw(opts: FlowOptions, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    z = torch.randn(batch, generator=generator, device=_where(generator), dtype=torch.float32)
    return torch.sigmoid(opts.sigmoid_scale * z)


def sample_sigmas(opts: FlowOptions, batch: int, *, image_tokens: int | None = None,
                  generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Draw one σ in [0, 1] per sample (shape [batch], fp32) for FLUX training.

    sigma: the weighting scheme's density indexed into the shifted 1000-step schedule
    (`discrete_schedule_sigma`); uniform: U(0,1); sigmoid: sigmoid(sigmoid_scale·N(0,1));
    shift: the sigmoid draw shifted by discrete_flow_shift; flux_shift: the sigmoid draw
    time-shifted with mu from `image_tokens` (see `flux_image_tokens`, required only here).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _bad("batch", "a positive integer", batch)
    mode = opts.timestep_sampling
    if mode == "sigma":
        sigma = discrete_schedule_sigma(density_u(opts, batch, generator), opts.discrete_flow_shift)
    elif mode == "uniform":
        sigma = torch.rand(batch, generator=generator, device=_where(generator), dtype=torch.float32)
    elif mode == "sigmoid":
        sigma = _sigmoid_draw(opts, batch, generator)
    elif mode == "shift":
        sigma = shift_sigma(_sigmoid_draw(opts, batch, generator), opts.discrete_flow_shift)
    elif mode == "flux_shift":
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 1:
            raise _bad("image_tokens", "a positive integer for timestep_sampling 'flux_shift'",
                       image_tokens)
        sigma = time_shift(flux_mu(image_tokens), _sigmoid_draw(opts, batch, generator))
    else:  # FlowOptions validates; this guards objects mutated after construction
        raise _bad("timestep_sampling", f"one of {TIMESTEP_SAMPLINGS}", mode)
    return sigma.to(device) if device is not None else sigma


# ---- input, target, prediction --------------------------------------------------------------

def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ of shape [B] (or a scalar) viewed as [B, 1, 1, ...] to broadcast over `like`."""
    sigma = sigma.to(device=like.device)
    if sigma.dim() == 0:
        return sigma
    return sigma.reshape((-1,) + (1,) * (like.dim() - 1))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1 − σ)·x0 + σ·noise, σ per sample; the result has x0's dtype."""
    s = _per_sample(sigma, x0).to(torch.float32)
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity target noise − x0 (FLUX, for every model_prediction_type as in sd-scripts)."""
    return noise - x0


def loss_weighting(weighting_scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight for σ of shape [B]: sigma_sqrt σ⁻², cosmap 2/(π(1 − 2σ + 2σ²)),
    otherwise 1 (the density schemes weight by sampling instead)."""
    sigma = sigma.float()
    if weighting_scheme == "sigma_sqrt":
        return sigma ** -2.0
    if weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise _bad("weighting_scheme", f"one of {WEIGHTING_SCHEMES}", weighting_scheme)
    return torch.ones_like(sigma)


def apply_prediction_type(opts: FlowOptions, pred: torch.Tensor, noisy: torch.Tensor,
                          sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the model output into what the loss compares with `flow_target`.

    raw: as is; additive: pred + noisy; sigma_scaled: pred·(−σ) + noisy, weighted by
    `loss_weighting(weighting_scheme, σ)`. Returns (prediction, weighting of shape [B]); multiply
    the per-sample loss by the weighting (sd-scripts multiplies the elementwise loss, which is
    the same once the loss is averaged per sample). Note sd-scripts keeps the target noise − x0
    for additive and sigma_scaled too; only raw's optimum is the velocity itself.
    """
    ones = torch.ones(pred.shape[0], dtype=torch.float32, device=pred.device)
    kind = opts.model_prediction_type
    if kind == "raw":
        return pred, ones
    if kind == "additive":
        return pred + noisy, ones
    if kind == "sigma_scaled":
        weighting = loss_weighting(opts.weighting_scheme, sigma.reshape(-1).to(pred.device))
        return pred * (-_per_sample(sigma, pred).to(pred.dtype)) + noisy, weighting
    raise _bad("model_prediction_type", f"one of {PREDICTION_TYPES}", kind)


# ---- SD3 (for the SD3 family) ---------------------------------------------------------------

def sd3_sample_sigmas(opts: FlowOptions, batch: int, *, training_shift: float = 1.0,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """σ per sample for SD3 as sd-scripts draws it: u from the weighting scheme's density,
    shifted by training_shift, quantized to t = floor(u·1000) and σ = t/1000.

    t is clamped to at least 1: at σ = 0 the sample teaches nothing and sigma_sqrt's weight
    would be infinite. timestep_sampling and discrete_flow_shift are not used.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _bad("batch", "a positive integer", batch)
    shift = _number("training_shift", training_shift, positive=True)
    u = shift_sigma(density_u(opts, batch, generator), shift)
    t = (u * NUM_TRAIN_TIMESTEPS).long().clamp(1, NUM_TRAIN_TIMESTEPS)
    sigma = t.float() / NUM_TRAIN_TIMESTEPS
    return sigma.to(device) if device is not None else sigma


def sd3_prediction(opts: FlowOptions, pred: torch.Tensor, noisy: torch.Tensor,
                   sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's x0 estimate pred·(−σ) + noisy, compared with `sd3_target`, and its per-sample
    weighting from `loss_weighting(weighting_scheme, σ)`."""
    weighting = loss_weighting(opts.weighting_scheme, sigma.reshape(-1).to(pred.device))
    return pred * (-_per_sample(sigma, pred).to(pred.dtype)) + noisy, weighting


def sd3_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """SD3's target: the clean latent x0 (noise is unused; the signature matches flow_target)."""
    return x0
