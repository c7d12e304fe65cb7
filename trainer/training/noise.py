"""Training noise: Gaussian noise with (random-strength) offset, multi-resolution noise,
and input-perturbation noise.

Every draw comes from the generator it is given, in fp32 on the generator's device, so a
seed gives the same noise whatever the latents' dtype or the number of data-parallel ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _where(latents: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else latents.device


def _per_sample_strength(batch: int, dims: int, generator: torch.Generator | None,
                         where: torch.device) -> torch.Tensor:
    """U[0,1) per sample, shaped [B,1,1,...] to scale that sample's tensor."""
    return torch.rand((batch,) + (1,) * (dims - 1), generator=generator, device=where, dtype=torch.float32)


def noise_like(latents: torch.Tensor, *, offset: float = 0.0, offset_random: bool = False,
               multires_iterations: int = 0, multires_discount: float = 0.3,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like `latents`.

    offset > 0 adds offset * N(0,1) per sample and channel (times U[0,1) per sample when
    offset_random); multires_iterations > 0 then turns it into pyramid noise.
    """
    where = _where(latents, generator)
    # fp32 draws keep a seed's noise the same whatever the latents' dtype.
    noise = torch.randn(latents.shape, generator=generator, device=where, dtype=torch.float32)
    if offset > 0:
        per_channel = latents.shape[:2] + (1,) * (latents.dim() - 2)
        shift = offset * torch.randn(per_channel, generator=generator, device=where, dtype=torch.float32)
        if offset_random:
            shift = shift * _per_sample_strength(latents.shape[0], latents.dim(), generator, where)
        noise += shift
    if multires_iterations > 0:
        noise = pyramid_noise(noise, multires_iterations, multires_discount, generator=generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: levels i = 0 .. iterations-1 add discount^i times N(0,1) noise of
    size (H/r^i, W/r^i), r ~ U[2,4) per level, upsampled bilinearly to (H, W); the levels stop
    once a side reaches 1. The sum is rescaled to unit standard deviation per sample.

    Level 0 is a second full-size noise, as in the multires noise of kohya's sd-scripts, so a
    setting copied from there gives the same pyramid.
    """
    where = noise.device
    batch, channels, height, width = noise.shape
    total = noise.to(dtype=torch.float32).clone()
    for level in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=generator, device=where))
        h, w = max(1, int(height / r ** level)), max(1, int(width / r ** level))
        coarse = torch.randn((batch, channels, h, w), generator=generator, device=where, dtype=torch.float32)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount ** level
        if h == 1 or w == 1:
            break  # the coarsest level is one cell
    std = total.std(dim=tuple(range(1, total.dim())), keepdim=True)
    return total / std


def input_perturbation(latents: torch.Tensor, gamma: float, *, random_strength: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """gamma * N(0,1) shaped like `latents` (gamma times U[0,1) per sample when random_strength),
    the extra noise of input-perturbation training; zeros when gamma is 0 (nothing drawn)."""
    if gamma <= 0:
        return torch.zeros_like(latents)
    where = _where(latents, generator)
    extra = torch.randn(latents.shape, generator=generator, device=where, dtype=torch.float32) * gamma
    if random_strength:
        extra = extra * _per_sample_strength(latents.shape[0], latents.dim(), generator, where)
    return extra.to(device=latents.device, dtype=latents.dtype)


__all__ = ["input_perturbation", "noise_like", "pyramid_noise"]
