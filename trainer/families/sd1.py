"""SD1.x: 4-level U-Net, one CLIP-L text encoder with A1111's clip skip, epsilon prediction."""
from __future__ import annotations

from .sd import UNetFamily


class SD1(UNetFamily):
    name = "sd1"
    label = "SD1.x"
    model_version = "sd_v1"
    modelspec_arch = "stable-diffusion-v1"
    applies_clip_skip = True
