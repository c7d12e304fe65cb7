"""Diffusion training pieces: timestep sampling, (offset) noise, targets, min-SNR weighted losses."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .params import ConfigError

LOSS_KINDS: tuple[str, ...] = ("MSE", "L1", "Smooth-L1")
_ELEMENTWISE = {
    "MSE": F.mse_loss,
    "L1": F.l1_loss,
    "Smooth-L1": lambda a, b, reduction: F.smooth_l1_loss(a, b, reduction=reduction, beta=1.0),
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


def noise_like(latents: torch.Tensor, *, offset: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus offset * N(0,1) per sample and channel when offset > 0."""
    where = generator.device if generator is not None else latents.device
    # fp32 draws keep a seed's noise the same whatever the latents' dtype.
    noise = torch.randn(latents.shape, generator=generator, device=where, dtype=torch.float32)
    if offset > 0:
        per_channel = latents.shape[:2] + (1,) * (latents.dim() - 2)
        noise += offset * torch.randn(per_channel, generator=generator, device=where, dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype)


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


def check_kind(kind: str) -> str:
    """The loss name as config.LOSSES spells it, or a ConfigError."""
    if kind not in _ELEMENTWISE:
        raise ConfigError("train_loss_function", kind, f"expected one of {', '.join(LOSS_KINDS)}")
    return kind


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss in fp32, averaged per sample over C,H,W (weighted by `mask` if given)."""
    elementwise = _ELEMENTWISE[check_kind(kind)](pred.float(), target.float(), reduction="none")
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


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, kind: str, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, snr_gamma: float, v_pred: bool,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss, detached per-sample losses [B]); per-sample values carry the min-SNR weight,
    so their mean is the loss."""
    per_sample = per_sample_loss(pred, target, kind, mask)
    if snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(timesteps, alphas_cumprod.to(per_sample.device),
                                                 snr_gamma, v_pred)
    return per_sample.mean(), per_sample.detach()


class DiffusionLoss:
    """diffusion_loss with the per-timestep min-SNR weights computed once, on the training device."""

    def __init__(self, kind: str, alphas_cumprod: torch.Tensor, *, snr_gamma: float, v_pred: bool,
                 device: Any) -> None:
        self.kind = check_kind(kind)
        ac = alphas_cumprod.to(device=device, dtype=torch.float32)
        every_t = torch.arange(ac.shape[0], device=ac.device)
        self.weights = min_snr_weight(every_t, ac, snr_gamma, v_pred) if snr_gamma > 0 else None

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        per_sample = per_sample_loss(pred, target, self.kind, mask)
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
    "LOSS_KINDS",
    "DiffusionLoss",
    "Ema",
    "check_kind",
    "diffusion_loss",
    "min_snr_weight",
    "noise_like",
    "per_sample_loss",
    "sample_timesteps",
    "snr",
    "training_target",
]
