"""Diffusion training pieces: timestep sampling, targets, the loss kinds (MSE, L1, scheduled
Huber / Smooth-L1) and the per-timestep weights (min-SNR, debiased estimation)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .noise import noise_like
from ..config.params import ConfigError

LOSS_KINDS: tuple[str, ...] = ("MSE", "L1", "Smooth-L1", "Huber")
HUBER_KINDS = ("Huber", "Smooth-L1")  # the kinds that take a per-sample c
DEBIASED_SNR_RANGE = (1e-3, 1000.0)  # 1/sqrt(snr) stays within [0.03, 32]; kohya caps snr at 1000


def _squared_excess(d2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sqrt(d² + c²) - c, written as d²/(sqrt(d² + c²) + c) so small errors do not cancel to 0 in fp32."""
    return d2 / (torch.sqrt(d2 + c * c) + c)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise 2c(sqrt((a-b)² + c²) - c): ≈ (a-b)² for |a-b| << c, ≈ 2c|a-b| for |a-b| >> c."""
    return 2.0 * c * _squared_excess((a - b) ** 2, c)


def smooth_l1(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise 2(sqrt((a-b)² + c²) - c): ≈ (a-b)²/c for small errors, ≈ 2|a-b| for large ones."""
    return 2.0 * _squared_excess((a - b) ** 2, c)


_ELEMENTWISE = {
    "MSE": lambda a, b, c: F.mse_loss(a, b, reduction="none"),
    "L1": lambda a, b, c: F.l1_loss(a, b, reduction="none"),
    "Smooth-L1": smooth_l1,
    "Huber": pseudo_huber,
}


def sample_timesteps(batch: int, t_min: int, t_max: int, *, same_in_batch: bool,
                     generator: torch.Generator | None = None, device: Any = "cpu") -> torch.Tensor:
    """`batch` timesteps drawn uniformly from [t_min, t_max); one shared value if same_in_batch."""
    if not 0 <= t_min < t_max:
        raise ConfigError("train_min_timesteps", t_min, f"must be 0 or more and below train_max_timesteps ({t_max})")
    # Draw on the generator's device so a seeded CPU generator gives the same values everywhere.
    where = generator.device if generator is not None else torch.device(device)
    t = torch.randint(t_min, t_max, (1 if same_in_batch else batch,), generator=generator, device=where)
    if same_in_batch:
        t = t.repeat(batch)
    return t.to(device)


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, v_pred: bool) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon) or the velocity (v-prediction)."""
    if v_pred:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1-ᾱ) at each timestep."""
    a = alphas_cumprod.to(torch.float32)[timesteps.to(alphas_cumprod.device)]
    return a / (1.0 - a)


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_pred: bool) -> torch.Tensor:
    """Min-SNR-γ weights [B]: min(snr, γ)/snr for epsilon, min(snr, γ)/(snr+1) for v; γ=0 gives ones."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=alphas_cumprod.device)
    s = snr(alphas_cumprod, timesteps)
    if v_pred:
        return torch.clamp(s, max=gamma) / (s + 1.0)
    # min(snr, γ)/snr written as min(1, γ/snr): the same value, and 1 (not NaN) where snr is 0.
    return torch.clamp(gamma / s, max=1.0)


def debiased_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, v_pred: bool) -> torch.Tensor:
    """Debiased-estimation weights [B]: 1/sqrt(snr) for epsilon, 1/(snr+1) for v-prediction
    (as kohya's sd-scripts); snr is capped at 1000 (t=0) and, for epsilon, floored at 1e-3, so a
    zero-SNR last step weighs about 32, not infinity."""
    s = snr(alphas_cumprod, timesteps).clamp(max=DEBIASED_SNR_RANGE[1])
    if v_pred:
        return 1.0 / (s + 1.0)  # finite (1) at snr 0: no lower cap needed
    return torch.rsqrt(s.clamp(min=DEBIASED_SNR_RANGE[0]))


def huber_c(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, c: float, schedule: str) -> torch.Tensor:
    """Per-sample Huber c [B] (fp32) for `schedule`.

    constant: c; exponential: exp(-αt) with α = -ln(c)/T (1 at t=0, c at t=T);
    snr: (1-c)/(1+σ)² + c with σ = sqrt((1-ᾱ)/ᾱ) (≈1 at clean timesteps, c at noisy ones).
    """
    ac = alphas_cumprod.to(torch.float32)
    t = timesteps.to(ac.device)
    if schedule == "constant":
        return torch.full(t.shape, float(c), dtype=torch.float32, device=ac.device)
    if schedule == "exponential":
        alpha = -math.log(c) / ac.shape[0]
        return torch.exp(-alpha * t.to(torch.float32))
    if schedule == "snr":
        a = ac[t]
        # 1/(1+σ)² = ᾱ/(sqrt(ᾱ)+sqrt(1-ᾱ))²: the same value, and 0 (not NaN) where ᾱ is 0.
        inv = a / (a.sqrt() + (1.0 - a).sqrt()) ** 2
        return (1.0 - c) * inv + c
    raise ConfigError("huber_schedule", schedule, "expected constant, exponential or snr")


def check_kind(kind: str) -> str:
    """The loss name as config.LOSSES spells it, or a ConfigError."""
    if kind not in _ELEMENTWISE:
        raise ConfigError("train_loss_function", kind, f"expected one of {', '.join(LOSS_KINDS)}")
    return kind


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                    mask: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss in fp32, averaged per sample over C,H,W (weighted by `mask` if given);
    Huber and Smooth-L1 take the per-sample c [B]."""
    kind = check_kind(kind)
    if kind in HUBER_KINDS:
        if c is None:
            raise ValueError(f"{kind} loss needs the per-sample Huber c")
        c = c.to(device=pred.device, dtype=torch.float32).view(-1, *(1,) * (pred.dim() - 1))
    elementwise = _ELEMENTWISE[kind](pred.float(), target.float(), c)
    dims = tuple(range(1, elementwise.dim()))
    if mask is None:
        return elementwise.mean(dim=dims)
    weights = _broadcast_mask(mask, elementwise).expand_as(elementwise)
    total = (elementwise * weights).sum(dim=dims)
    # A sample whose mask is all zero contributes 0, not NaN.
    return total / weights.sum(dim=dims).clamp_min(1e-8)


def _broadcast_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W], [B,C,H,W], [B,H,W] or [H,W] masks as an fp32 tensor that broadcasts to `like`."""
    mask = mask.to(device=like.device, dtype=torch.float32)
    if mask.dim() == like.dim() - 1:
        mask = mask.unsqueeze(1)
    elif mask.dim() == 2:
        mask = mask.view(1, 1, *mask.shape)
    if mask.dim() != like.dim() or mask.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match latents of shape {tuple(like.shape)}")
    return mask


def timestep_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *, snr_gamma: float,
                     v_pred: bool, debiased: bool = False) -> torch.Tensor | None:
    """The loss weight per sample [B]: min-SNR times debiased estimation (kohya applies them in
    that order, one after the other); None when neither is on."""
    weight = None
    if snr_gamma > 0:
        weight = min_snr_weight(timesteps, alphas_cumprod, snr_gamma, v_pred)
    if debiased:
        extra = debiased_weight(timesteps, alphas_cumprod, v_pred)
        weight = extra if weight is None else weight * extra
    return weight


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, kind: str, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, snr_gamma: float, v_pred: bool,
                   mask: torch.Tensor | None = None, debiased: bool = False, c: float = 0.1,
                   schedule: str = "constant") -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss, detached per-sample losses [B]); per-sample values carry the timestep weight,
    so their mean is the loss. `c` and `schedule` set Huber / Smooth-L1's per-sample c."""
    ac = alphas_cumprod.to(pred.device)
    per_c = huber_c(timesteps, ac, c, schedule) if kind in HUBER_KINDS else None
    per_sample = per_sample_loss(pred, target, kind, mask, per_c)
    weight = timestep_weights(timesteps, ac, snr_gamma=snr_gamma, v_pred=v_pred, debiased=debiased)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.device)
    return per_sample.mean(), per_sample.detach()


class DiffusionLoss:
    """diffusion_loss with the per-timestep weights and Huber c computed once, on the training device."""

    def __init__(self, kind: str, alphas_cumprod: torch.Tensor, *, snr_gamma: float, v_pred: bool,
                 device: Any, debiased: bool = False, c: float = 0.1, schedule: str = "constant") -> None:
        self.kind = check_kind(kind)
        ac = alphas_cumprod.to(device=device, dtype=torch.float32)
        every_t = torch.arange(ac.shape[0], device=ac.device)
        self.weights = timestep_weights(every_t, ac, snr_gamma=snr_gamma, v_pred=v_pred, debiased=debiased)
        self.c = huber_c(every_t, ac, c, schedule) if self.kind in HUBER_KINDS else None

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        per_c = None if self.c is None else self.c[timesteps.to(self.c.device)]
        per_sample = per_sample_loss(pred, target, self.kind, mask, per_c)
        if self.weights is not None:
            per_sample = per_sample * self.weights[timesteps.to(self.weights.device)]
        return per_sample.mean(), per_sample.detach()


class Ema:
    """The smoothed loss TrainTrain shows: ema = (1-α)·ema + α·loss, starting at the first loss."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, loss: float) -> float:
        """Fold in one loss and return the new average."""
        loss = float(loss)
        self.value = loss if self.value is None else (1.0 - self.alpha) * self.value + self.alpha * loss
        return self.value


__all__ = [
    "DEBIASED_SNR_RANGE",
    "HUBER_KINDS",
    "LOSS_KINDS",
    "DiffusionLoss",
    "Ema",
    "check_kind",
    "debiased_weight",
    "diffusion_loss",
    "huber_c",
    "min_snr_weight",
    "noise_like",
    "per_sample_loss",
    "pseudo_huber",
    "sample_timesteps",
    "smooth_l1",
    "snr",
    "timestep_weights",
    "training_target",
]
