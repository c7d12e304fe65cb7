"""U-Net module paths in the original-model (ldm/sgm) layout, for kohya key names.

sd-scripts names SDXL LoRA modules after the original model (``input_blocks.4.1``,
``output_blocks.2.2.conv``), and every consumer reads those names as they are. A
diffusers path (``up_blocks.0.upsamplers.0.conv``) is only understood through
A1111's converter, which assumes SD1's layout and puts some SDXL layers on the wrong
index, so SDXL files are written in the original layout. The mapping is built from
the U-Net's own structure (layers per block, which up blocks have attention).
"""
from __future__ import annotations

from typing import Iterable

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SAMPLER_CONV = {"downsamplers": "op", "upsamplers": "conv"}


def _structure(unet: torch.nn.Module) -> tuple[int, list[bool]]:
    """(layers per down block, whether each up block has attention)."""
    lpb = int(unet.config.layers_per_block) if isinstance(unet.config.layers_per_block, int) else \
        int(unet.config.layers_per_block[0])
    has_attn = [getattr(block, "attentions", None) is not None for block in unet.up_blocks]
    return lpb, has_attn


def _block_prefix(parts: list[str], lpb: int, has_attn: list[bool]) -> tuple[str, int] | None:
    """(ldm prefix, how many diffusers parts it replaces) for a path inside a down/mid/up block."""
    head = parts[0]
    if head == "mid_block" and len(parts) >= 3 and parts[2].isdigit():
        kind, j = parts[1], int(parts[2])
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}", 3
    if head not in ("down_blocks", "up_blocks") or len(parts) < 4 or not parts[1].isdigit() or not parts[3].isdigit():
        return None
    b, kind, j = int(parts[1]), parts[2], int(parts[3])
    if head == "down_blocks":
        if kind in ("resnets", "attentions"):
            return f"input_blocks.{1 + b * (lpb + 1) + j}.{1 if kind == 'attentions' else 0}", 4
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0", 4
        return None
    if kind in ("resnets", "attentions"):
        return f"output_blocks.{b * (lpb + 1) + j}.{1 if kind == 'attentions' else 0}", 4
    if kind == "upsamplers":
        return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn[b] else 1}", 4
    return None


def ldm_path(path: str, lpb: int, has_attn: list[bool]) -> str | None:
    """The original-model path of a diffusers U-Net module path, or None for containers."""
    for old, new in _TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    parts = path.split(".")
    found = _block_prefix(parts, lpb, has_attn)
    if found is None:
        return None
    prefix, used = found
    kind, rest = parts[used - 2], parts[used:]  # resnets / attentions / ...samplers, then inside it
    if rest and kind == "resnets" and rest[0] in _RESNET:
        rest = _RESNET[rest[0]].split(".") + rest[1:]
    elif rest and kind in _SAMPLER_CONV and rest[0] == "conv":
        rest = [_SAMPLER_CONV[kind]] + rest[1:]
    return ".".join([prefix, *rest])


def kohya_unet_renames(unet: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{``lora_unet_<diffusers path>``: ``lora_unet_<ldm path>``} for the given kohya names.

    A name with no original-model counterpart is an error: writing it as it is would
    give a key that consumers of original-layout files drop.
    """
    lpb, has_attn = _structure(unet)
    by_kohya = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules() if n}
    out: dict[str, str] = {}
    for name in names:
        path = by_kohya.get(name)
        target = ldm_path(path, lpb, has_attn) if path is not None else None
        if target is None:
            raise ValueError(f"{name}: no original-model name for this U-Net module")
        out[name] = "lora_unet_" + target.replace(".", "_")
    return out
