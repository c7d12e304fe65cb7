"""SD3 / SD3.5 parts, offline: the MMDiT from a SAI single file (configs read off tensor shapes,
converted by diffusers' own single-file converter), CLIP-L / CLIP-G / T5-XXL from the same file or
from separate files, the 16-channel autoencoder, and diffusers folders.

Variants, as sd-scripts' sd3_utils tells them: no q/k RMS norm -> SD3 medium ("medium"); q/k norm
and a second x-block attention (MMDiT-X) -> SD3.5 medium ("5-medium"); q/k norm only -> SD3.5
large ("5-large").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

from .flux_load import FluxLoadError, _assign, _count, _read, _sample, read_keys
from .flux_parts import CLIP_MARK, _ae, _t5xxl, clip_l_config

SAI_PREFIXES = ("model.diffusion_model.", "")
MARKERS = ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight",
           "x_embedder.proj.weight", "pos_embed")
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609  # SD3's vae/config.json
T5_MAX_LENGTH = 256  # diffusers' and sd-scripts' default for SD3
TE_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
               "t5xxl": "text_encoders.t5xxl.transformer."}
SHIFT = {"medium": 3.0, "5-medium": 3.0, "5-large": 3.0}  # scheduler shift of the published configs


class SD3LoadError(FluxLoadError):
    """An SD3 file or folder could not be used; the message starts with the role it was read for."""


def sai_prefix(keys: list[str] | set[str]) -> str | None:
    """The prefix of an MMDiT in SAI layout (bare or under `model.diffusion_model.`), or None."""
    keyset = set(keys)
    return next((p for p in SAI_PREFIXES if all(p + m in keyset for m in MARKERS)), None)


def variant(keys: list[str] | set[str]) -> str:
    """sd-scripts' model type: "medium" (SD3), "5-medium" or "5-large" (SD3.5), from the keys."""
    keys = list(keys)
    if not any(".attn.ln_k." in k for k in keys):
        return "medium"
    return "5-medium" if any(".x_block.attn2." in k for k in keys) else "5-large"


def diffusers_variant(config: Any) -> str:
    """The same for a diffusers SD3Transformer2DModel config."""
    if not config.qk_norm:
        return "medium"
    return "5-medium" if tuple(getattr(config, "dual_attention_layers", ()) or ()) else "5-large"


def transformer_config(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """SD3Transformer2DModel config read off a SAI state dict (prefix stripped)."""
    try:
        inner, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
        ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
        head_dim = int(ln_q.shape[0]) if ln_q is not None else 64  # SD3's heads are 64 wide
        joint, pooled = sd["context_embedder.weight"].shape[1], sd["y_embedder.mlp.0.weight"].shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        positions = sd["pos_embed"].shape[1]
    except KeyError as exc:
        raise SD3LoadError(f"model: {path} is incomplete (no {exc.args[0]})") from exc
    side = math.isqrt(positions)
    dual = tuple(sorted({int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.") and ".x_block.attn2." in k}))
    return {"sample_size": 128, "patch_size": patch, "in_channels": in_ch, "num_layers": _count(sd, "joint_blocks."),
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim, "joint_attention_dim": joint,
            "caption_projection_dim": inner, "pooled_projection_dim": pooled, "out_channels": out_ch,
            "pos_embed_max_size": side, "dual_attention_layers": dual,
            "qk_norm": "rms_norm" if ln_q is not None else None}


def load_sd3_transformer(path: str | Path, keys: list[str], *, dtype: torch.dtype) -> SD3Transformer2DModel:
    """A frozen SD3Transformer2DModel from a SAI single file, converted by diffusers' converter."""
    path = Path(path)
    prefix = sai_prefix(keys)
    if prefix is None:
        raise SD3LoadError(f"model: {path} holds no SD3 MMDiT weights (found keys like {_sample(keys)})")
    sd = _read(path, keys, prefix, role="model", dtype=dtype)
    sd = {k: v for k, v in sd.items() if not k.startswith(("text_encoders.", "first_stage_model."))}
    config = transformer_config(sd, path)
    try:
        converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers(sd)
    except KeyError as exc:
        raise SD3LoadError(f"model: {path} is incomplete (no {exc.args[0]})") from exc
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    return _assign(model, converted, role="model", path=path)


def clip_config(sd: dict[str, torch.Tensor], role: str) -> CLIPTextConfig:
    """CLIP-L (quick GELU) or OpenCLIP bigG (GELU) text config with its projection, off the shapes."""
    cfg = clip_l_config(sd)
    cfg.hidden_act = "quick_gelu" if role == "clip_l" else "gelu"
    if "text_projection.weight" not in sd:
        raise SD3LoadError(f"{role}: no text_projection.weight (SD3 uses the projected pooled output)")
    cfg.projection_dim = sd["text_projection.weight"].shape[0]
    return cfg


def load_clip(path: Path, keys: list[str], role: str, dtype: torch.dtype,
              prefix: str | None = None) -> CLIPTextModelWithProjection:
    """CLIP-L or CLIP-G with projection in transformers layout, under `prefix` (found when None)."""
    if prefix is None:
        key = next((k for k in sorted(keys, key=len) if k.endswith(CLIP_MARK)), None)
        prefix = None if key is None else key[: -len(CLIP_MARK)].removesuffix("text_model.")
    if prefix is None or not any(k.startswith(prefix) and ".self_attn.q_proj." in k for k in keys):
        raise SD3LoadError(f"{role}: {path} holds no CLIP text encoder weights in transformers layout "
                           f"(found keys like {_sample(keys)})")
    found = _read(path, keys, prefix, role=role, dtype=dtype)
    part = {k.removeprefix("text_model."): v for k, v in found.items() if not k.endswith("position_ids")}
    with init_empty_weights():
        model = CLIPTextModelWithProjection(clip_config(part, role))
    nested = any(k.startswith("text_model.") for k in model.state_dict())  # transformers 5 drops the level
    part = {(("text_model." if nested else "") + k if not k.startswith("text_projection.") else k): v
            for k, v in part.items() if k.startswith(("embeddings.", "encoder.", "final_layer_norm.", "text_projection."))}
    return _assign(model, part, role=role, path=path)


@dataclass
class SD3Parts:
    transformer: SD3Transformer2DModel
    clip_l: CLIPTextModelWithProjection
    clip_g: CLIPTextModelWithProjection
    t5xxl: T5EncoderModel | None
    vae: AutoencoderKL
    variant: str


def _part(role: str, model: Path, model_keys: list[str], given: Path | None, dtype: torch.dtype) -> Any:
    """One text encoder or the autoencoder: from its own file, else from the model file."""
    path, keys = (given, read_keys(given, role=role)) if given else (model, model_keys)
    try:
        if role in ("clip_l", "clip_g"):
            prefix = None if given else TE_PREFIXES[role]
            return load_clip(path, keys, role, dtype, prefix)
        if role == "t5xxl":
            if not given and not any(k.startswith(TE_PREFIXES["t5xxl"]) for k in keys):
                return None  # SD3 trains without T5: its tokens are zeros
            return _t5xxl(path, keys if given else [k for k in keys if k.startswith(TE_PREFIXES["t5xxl"])], dtype)
        vae_keys = keys if given else [k for k in keys if k.startswith("first_stage_model.")]
        vae = _ae(path, vae_keys, dtype)
        vae.register_to_config(scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT)
        return vae
    except FluxLoadError as exc:
        detail = str(exc).split(":", 1)[-1].strip()
        hint = "" if given else f" ({model.name} holds no {role} part: choose the {role} file)"
        raise SD3LoadError(f"{role}: {detail}{hint}") from None
    except KeyError as exc:
        raise SD3LoadError(f"{role}: {path} is incomplete (no {exc.args[0]})") from exc


def load_sd3_files(model: str | Path, components: dict[str, str | Path | None], *,
                   dtype: torch.dtype) -> SD3Parts:
    """Every part from a SAI single file and the separate files named in `components`
    (clip_l, clip_g, t5xxl, ae); a part not named is read from the model file."""
    model = Path(model)
    keys = read_keys(model, role="model")
    transformer = load_sd3_transformer(model, keys, dtype=dtype)
    parts = {role: _part(role, model, keys, Path(components[role]) if components.get(role) else None, dtype)
             for role in ("clip_l", "clip_g", "t5xxl", "ae")}
    return SD3Parts(transformer, parts["clip_l"], parts["clip_g"], parts["t5xxl"], parts["ae"], variant(keys))


def sd3_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler (its published scheduler_config.json: 1000 steps, shift 3.0)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
