"""FLUX.1's transformer from a BFL single file, offline, and what the other FLUX readers share.

Reads a BFL single file (`flux1-dev.safetensors` or `.sft`; bf16, fp16 or float8_e4m3fn); the
config is read off tensor shapes, nothing is fetched. The text encoders, the autoencoder, T5's
tokenizer and diffusers folders are read by flux_parts.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open

FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
BFL_PREFIXES = ("", "model.diffusion_model.")  # ComfyUI's all-in-one checkpoints nest the transformer
BFL_MARKERS = ("img_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
               "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
GUIDANCE_KEY = "guidance_in.in_layer.weight"
# diffusers' converter splits single-block linear1 at FLUX.1's width whatever the file holds.
FLUX_WIDTH, FLUX_MLP = 3072, 12288
AE_SCALING, AE_SHIFT = 0.3611, 0.1159  # FLUX.1's vae/config.json; ae.safetensors does not carry them
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
SCHEDULER = {  # FLUX.1-dev / -schnell scheduler/scheduler_config.json
    "dev": {"shift": 3.0, "use_dynamic_shifting": True},
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
}


class FluxLoadError(ValueError):
    """A FLUX file or folder could not be used; the message names it and what is wrong."""


def _sample(keys: Iterable[str], n: int = 4) -> str:
    return ", ".join(sorted(keys)[:n]) or "none"


def _bfl_prefix(keys: Iterable[str]) -> str | None:
    keyset = set(keys)
    return next((p for p in BFL_PREFIXES if all(p + m in keyset for m in BFL_MARKERS)), None)


def is_flux_state_dict(keys: Iterable[str]) -> bool:
    """True for a FLUX.1 transformer in BFL layout (bare or under `model.diffusion_model.`)."""
    return _bfl_prefix(keys) is not None


def flux_variant(keys: Iterable[str]) -> str:
    """"dev" when the file has the guidance embedder (guidance-distilled), else "schnell"."""
    keys = list(keys)
    prefix = _bfl_prefix(keys)
    if prefix is None:
        raise FluxLoadError(f"not a FLUX.1 transformer (found keys like {_sample(keys)})")
    return "dev" if prefix + GUIDANCE_KEY in set(keys) else "schnell"


def read_keys(path: str | Path, *, role: str) -> list[str]:
    """Tensor names of a safetensors file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise FluxLoadError(f"{role}: {path} does not exist")
    if path.suffix.lower() in (".gguf", ".ckpt", ".pt", ".pth", ".bin"):
        raise FluxLoadError(f"{role}: {path} is a {path.suffix} file; FLUX parts are read from .safetensors "
                            "or .sft files (GGUF and NF4 files are for inference only)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise FluxLoadError(f"{role}: {path} is not a readable safetensors file ({exc})") from exc


def _cast(t: torch.Tensor, dtype: torch.dtype, keep_fp8: bool) -> torch.Tensor:
    """A floating tensor in `dtype`; an fp8 one stays fp8 when asked (its compute casts it)."""
    if not t.is_floating_point() or t.dtype == dtype or (keep_fp8 and t.dtype in FP8):
        return t
    return t.to(dtype)


def _read(path: Path, keys: list[str], prefix: str, *, role: str, dtype: torch.dtype,
          keep_fp8: bool = False) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, prefix stripped, cast one by one (peak memory: the result)."""
    if any(k.endswith(("scaled_fp8", ".scale_weight")) for k in keys):
        raise FluxLoadError(f"{role}: {path} holds ComfyUI 'scaled fp8' weights, which need per-tensor "
                            "scales; use an fp16, bf16 or plain float8_e4m3fn file")
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: _cast(f.get_tensor(k), dtype, keep_fp8) for k in keys if k.startswith(prefix)}


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor], *, role: str, path: Path) -> torch.nn.Module:
    """Put `sd` into a module built on the meta device; every parameter must be covered."""
    try:
        _, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise FluxLoadError(f"{role}: {path} does not fit the layout read off its shapes ({detail})") from exc
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise FluxLoadError(f"{role}: {path} does not fit the layout read off its shapes "
                            f"(missing: {missing[:3]}, unexpected: {list(unexpected)[:3]})")
    return module.eval().requires_grad_(False)


def _count(keys: Iterable[str], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def _rope_axes(head_dim: int, path: Path) -> tuple[int, int, int]:
    """FLUX.1 splits its 128-wide heads (16, 56, 56) over (index, y, x): 1/8, then halves."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    if first % 2 or rest % 2 or first + 2 * rest != head_dim:
        raise FluxLoadError(f"transformer: {path} has {head_dim}-wide attention heads, which have no "
                            "known rotary split (FLUX.1 uses 128)")
    return first, rest, rest


def transformer_config(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """FluxTransformer2DModel config read off a BFL state dict (prefix stripped)."""
    inner, in_ch = sd["img_in.weight"].shape
    if in_ch != 64:
        raise FluxLoadError(f"transformer: {path} takes {in_ch} input channels (a Fill, Depth or Canny "
                            "model?); only text-to-image FLUX.1 models (64) can be trained")
    try:
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        joint, pooled = sd["txt_in.weight"].shape[1], sd["vector_in.in_layer.weight"].shape[1]
    except KeyError as exc:
        raise FluxLoadError(f"transformer: {path} is incomplete (no {exc.args[0]})") from exc
    return {
        "patch_size": 1, "in_channels": in_ch, "num_layers": _count(sd, "double_blocks."),
        "num_single_layers": _count(sd, "single_blocks."), "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim, "joint_attention_dim": joint, "pooled_projection_dim": pooled,
        "guidance_embeds": GUIDANCE_KEY in sd, "axes_dims_rope": _rope_axes(head_dim, path),
    }


def _widen_linear1(sd: dict[str, torch.Tensor], width: int, path: Path) -> int:
    """Lay narrow single-block linear1 weights out at FLUX.1's width; returns the MLP width."""
    mlp = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * width
    if width == FLUX_WIDTH and mlp == FLUX_MLP:
        return mlp
    if width > FLUX_WIDTH or mlp > FLUX_MLP:
        raise FluxLoadError(f"transformer: {path} is wider than FLUX.1 ({width}, MLP {mlp})")
    starts = (0, FLUX_WIDTH, 2 * FLUX_WIDTH, 3 * FLUX_WIDTH)
    for key in [k for k in sd if k.startswith("single_blocks.") and ".linear1." in k]:
        parts = torch.split(sd[key], (width, width, width, mlp), dim=0)
        wide = torch.zeros((3 * FLUX_WIDTH + FLUX_MLP, *sd[key].shape[1:]), dtype=sd[key].dtype)
        for start, part in zip(starts, parts):
            wide[start:start + part.shape[0]] = part
        sd[key] = wide
    return mlp


def bfl_to_diffusers(sd: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """diffusers' own FLUX conversion; `sd` is consumed."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = _widen_linear1(sd, width, path)
    try:
        converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(sd)
    except KeyError as exc:
        raise FluxLoadError(f"transformer: {path} is incomplete (no {exc.args[0]})") from exc
    if sd:
        raise FluxLoadError(f"transformer: {path} has keys FLUX.1 does not have (like {_sample(sd)})")
    if width != FLUX_WIDTH or mlp != FLUX_MLP:
        for key in [k for k in converted if k.startswith("single_transformer_blocks.")]:
            if ".attn.to_" in key or ".proj_mlp." in key:
                converted[key] = converted[key][: mlp if ".proj_mlp." in key else width].clone()
    return converted


def load_flux_transformer(path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                          keep_fp8: bool = False) -> FluxTransformer2DModel:
    """A frozen FluxTransformer2DModel from a BFL single file.

    fp8 tensors are upcast to `dtype` unless `keep_fp8` (then they stay float8 storage and the caller
    must cast them in forward). `model.config.guidance_embeds` is True for dev, False for schnell.
    """
    path = Path(path)
    keys = read_keys(path, role="transformer")
    prefix = _bfl_prefix(keys)
    if prefix is None:
        raise FluxLoadError(f"transformer: {path} holds no FLUX.1 transformer weights in BFL layout "
                            f"(found keys like {_sample(keys)})")
    sd = _read(path, keys, prefix, role="transformer", dtype=dtype, keep_fp8=keep_fp8)
    config = transformer_config(sd, path)
    converted = bfl_to_diffusers(sd, config, path)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    return _assign(model, converted, role="transformer", path=path)


def flux_scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of FLUX.1 dev or schnell, from their published configs."""
    if variant not in SCHEDULER:
        raise FluxLoadError(f"variant: {variant!r} is not one of {sorted(SCHEDULER)}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096,
                                           base_shift=0.5, max_shift=1.15, **SCHEDULER[variant])
