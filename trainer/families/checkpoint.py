"""Reading Stable Diffusion checkpoint files safely and telling what they hold.

A `.ckpt`/`.pt`/`.pth` is a pickle; it is only ever opened with
`torch.load(weights_only=True)`, which refuses anything that would run code.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."

# Old SD1 files were saved before transformers nested CLIP under `text_model`;
# A1111 renames these prefixes the same way.
_SD1_CLIP_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


class ModelError(ValueError):
    """A model file or state dict could not be used; the message names it."""


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned (A1111 files nest it under state_dict)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _is_pickle(path: Path) -> bool:
    """True when the file starts with a pickle's PROTO opcode (every torch.save wrote one since protocol 2)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    # mmap avoids a second copy in memory; only the zip format supports it.
    mmap = zipfile.is_zipfile(path)
    if not mmap and not _is_pickle(path):
        raise ModelError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise ModelError(
            f"{path}: refused to load this pickle because it holds more than tensors (it could run code). "
            f"Convert it to .safetensors with a tool you trust. {detail.split('. ')[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return _unwrap(obj, path)


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
    return tensors, meta


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a checkpoint file, on the CPU as stored."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path), {}
    raise ModelError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors, .ckpt, .pt or .pth")


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy SD1 CLIP keys (the tensors themselves are not copied)."""
    if not any(k.startswith(old) for k in sd for old in _SD1_CLIP_RENAMES):
        return sd
    out = {}
    for key, value in sd.items():
        for old, new in _SD1_CLIP_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def sibling_yaml(path: str | Path) -> Path | None:
    """model.yaml next to model.ckpt / model.safetensors (A1111 convention), if present."""
    path = Path(path)
    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate.is_file():
            return candidate
    return None


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _linear_proj_in(sd: Mapping, keys: list[str], suffix: str) -> bool | None:
    """True if the U-Net's transformer proj_in is Linear (SD2), False if a 1x1 conv (SD1)."""
    for key in keys:
        if key.endswith(suffix) and isinstance(sd.get(key), torch.Tensor):
            return sd[key].ndim == 2
    return None


def detect_unet_family(keys: Iterable[str] | Mapping[str, torch.Tensor], *, name: str = "state dict") -> str:
    """"sd1", "sd2" or "sdxl" from ldm (A1111) checkpoint keys or a diffusers U-Net state dict.

    Telling SD1 from SD2 by the U-Net alone needs the tensors' shapes, so pass the
    state dict itself (not just its keys) when no text encoder keys are in it.
    """
    sd = keys if isinstance(keys, Mapping) else {}
    keys = list(keys)
    if _has_prefix(keys, UNET_PREFIX):
        if _has_prefix(keys, "conditioner.embedders.1.model."):
            return "sdxl"
        if _has_prefix(keys, "conditioner.embedders.0.model."):
            raise ModelError(f"{name}: looks like an SDXL refiner, which cannot be trained here")
        if _has_prefix(keys, "cond_stage_model.model."):
            return "sd2"
        if _has_prefix(keys, "cond_stage_model.transformer."):
            return "sd1"
        if UNET_PREFIX + "label_emb.0.0.weight" in keys:
            return "sdxl"
        linear = _linear_proj_in(sd, keys, ".1.proj_in.weight")
    elif "conv_in.weight" in keys and _has_prefix(keys, "down_blocks."):
        if "add_embedding.linear_1.weight" in keys:
            return "sdxl"
        linear = _linear_proj_in(sd, keys, "attentions.0.proj_in.weight")
    else:
        raise ModelError(f"{name}: not a Stable Diffusion checkpoint (no U-Net weights such as {UNET_PREFIX}*)")
    if linear is None:
        raise ModelError(f"{name}: cannot tell SD1 from SD2 without text encoder keys or tensor shapes")
    return "sd2" if linear else "sd1"


def v_pred_hint(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], original_config: dict | None) -> bool | None:
    """What the file itself says about v-prediction: True, False (a yaml says epsilon), or None."""
    params = (original_config or {}).get("model", {}).get("params", {}) or {}
    if params.get("parameterization") == "v":
        return True
    # Some v-prediction SDXL fine-tunes mark themselves with an empty `v_pred` tensor.
    if "v_pred" in sd or str(meta.get("modelspec.prediction_type", "")).lower() in ("v", "v_prediction"):
        return True
    if original_config is not None:
        return False
    return None
