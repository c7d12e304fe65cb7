"""FLUX.1 (dev and schnell): a flow-matching MMDiT (diffusers' FluxTransformer2DModel) with CLIP-L
(pooled) and T5-XXL (tokens) text encoders and a 16-channel autoencoder.

Latents are kept as the VAE makes them ([B, 16, H/8, W/8], shifted and scaled) everywhere in the
trainer; only `denoise` packs them into FLUX's 2×2 patch tokens and back. Timesteps are σ in
[0, 1] (`flow.py`), which is also what the transformer takes. LoRA files use sd-scripts' BFL key
layout (`flux_keys.py`); the files a user has are read by `flux_load.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..config.params import ConfigError
from . import flow
from .base import Family

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond

BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight")
CLIP_LENGTH = 77


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FLUX's 2×2 patch tokens, row by row."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `height` × `width` cells."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of the patch tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flow_options(cfg: Any) -> flow.FlowOptions:
    """The job's flow-matching settings; a bad value names its preset key."""
    try:
        return flow.FlowOptions(timestep_sampling=cfg.timestep_sampling, sigmoid_scale=cfg.sigmoid_scale,
                                discrete_flow_shift=cfg.discrete_flow_shift, weighting_scheme=cfg.weighting_scheme,
                                logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                model_prediction_type=cfg.model_prediction_type)
    except ValueError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(key, getattr(cfg, key, None), str(exc).split(":", 1)[-1].strip()) from None
