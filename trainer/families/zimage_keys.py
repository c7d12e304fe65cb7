"""Z-Image's key layouts: telling its checkpoints apart, the original single-file layout read into
diffusers' ZImageTransformer2DModel, the config read off tensor shapes, and the LoRA file layout.

Checkpoints come in two layouts:
- diffusers (``transformer/`` of a ZImagePipeline folder): ``all_x_embedder.2-1.*``,
  ``layers.{i}.attention.to_q/to_k/to_v/to_out.0``, ``attention.norm_q/norm_k``;
- the original one (Tongyi's and ComfyUI's single files, bare or under ``model.diffusion_model.``):
  ``x_embedder.*``, ``final_layer.*``, a fused ``attention.qkv``, ``attention.out``,
  ``attention.q_norm/k_norm``, and a ``norm_final.weight`` that diffusers does not keep.
Lumina 2 shares the original names but its modulation is ``adaLN_modulation.1`` (after a SiLU);
Z-Image's is ``adaLN_modulation.0``, which is what tells them apart.

LoRA files name the transformer's modules by their diffusers paths under ``diffusion_model.``
(``diffusion_model.layers.0.attention.to_q.lora_down.weight``), with kohya's tensor names
(``lora_down``/``lora_up``/``alpha``, ``hada_*``, ``lokr_*``, ``dora_scale``). ComfyUI's
``model_lora_keys_unet`` maps exactly these names for Z-Image (its Lumina2 branch, built from
``z_image_to_diffusers``), slicing to_q/to_k/to_v into the original fused qkv; Forge Neo's loader
uses the same map. In memory the network keeps LyCORIS's ``lora_unet_<path with _>`` names.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import torch

PREFIXES = ("", "model.diffusion_model.")
DIFFUSERS_MARKERS = ("all_x_embedder.2-1.weight", "layers.0.attention.to_q.weight", "layers.0.adaLN_modulation.0.weight")
ORIGINAL_MARKERS = ("x_embedder.weight", "layers.0.attention.qkv.weight", "layers.0.adaLN_modulation.0.weight",
                    "noise_refiner.0.attention.qkv.weight", "cap_embedder.1.weight")
FILE_PREFIX = "diffusion_model."
BLOCK_LISTS = ("layers", "noise_refiner", "context_refiner")
# The Linear layers of a ZImageTransformerBlock (diffusers paths inside the block).
BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
_INNER = {name.replace(".", "_"): name for name in BLOCK_LINEARS}
_MEMORY = re.compile(r"^lora_unet_(%s)_(\d+)_(%s)$" % ("|".join(BLOCK_LISTS), "|".join(map(re.escape, _INNER))))
_FILE = re.compile(r"^%s(%s)\.(\d+)\.(%s)\.(.+)$" % (re.escape(FILE_PREFIX), "|".join(BLOCK_LISTS),
                                                   "|".join(map(re.escape, BLOCK_LINEARS))))
ORIGINAL_RENAMES = (("x_embedder.", "all_x_embedder.2-1."), ("final_layer.", "all_final_layer.2-1."),
                    (".attention.out.", ".attention.to_out.0."), (".attention.q_norm.", ".attention.norm_q."),
                    (".attention.k_norm.", ".attention.norm_k."))


class ZImageKeyError(ValueError):
    """A Z-Image state dict or LoRA file could not be read; the message names what is wrong."""


def layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """("diffusers" | "original", prefix) of a Z-Image transformer's keys, or None for other models."""
    keyset = set(keys)
    for prefix in PREFIXES:
        if all(prefix + m in keyset for m in DIFFUSERS_MARKERS):
            return "diffusers", prefix
        if all(prefix + m in keyset for m in ORIGINAL_MARKERS):
            return "original", prefix
    return None


def original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names for an original-layout state dict (prefix stripped); `sd` is consumed.

    The fused qkv is split as [q; k; v] along the output rows, q as wide as the model.
    """
    out: dict[str, torch.Tensor] = {}
    sd.pop("norm_final.weight", None)  # an affine-free norm's leftover; diffusers has no such weight
    for key in list(sd):
        value = sd.pop(key)
        if key.endswith(".attention.qkv.weight"):
            width = value.shape[1]
            kv = (value.shape[0] - width) // 2
            q, k, v = torch.split(value, (width, kv, kv), dim=0)
            stem = key[: -len("qkv.weight")]
            out.update({stem + "to_q.weight": q, stem + "to_k.weight": k, stem + "to_v.weight": v})
            continue
        for old, new in ORIGINAL_RENAMES:
            if old.startswith("."):
                key = key.replace(old, new)
            elif key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def _count(keys: Iterable[str], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def rope_axes(head_dim: int) -> list[int]:
    """Z-Image splits its 128-wide heads (32, 48, 48) over (caption index, y, x): 1/4, then 3/8 each."""
    first = head_dim // 4
    rest = (head_dim - first) // 2
    if first % 2 or rest % 2 or first + 2 * rest != head_dim:
        raise ZImageKeyError(f"{head_dim}-wide attention heads have no known rotary split (Z-Image uses 128)")
    return [first, rest, rest]


def transformer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """ZImageTransformer2DModel config read off a diffusers-layout state dict."""
    if any(k.startswith(("siglip_", "control_")) for k in sd):
        raise ZImageKeyError("holds SigLIP or control layers (an Omni or ControlNet model); only text-to-image "
                             "Z-Image transformers can be trained")
    try:
        dim, patch_in = sd["all_x_embedder.2-1.weight"].shape
        head_dim = sd["layers.0.attention.norm_q.weight"].shape[0]
        kv = sd["layers.0.attention.to_k.weight"].shape[0]
        cap = sd["cap_embedder.1.weight"].shape[1]
    except KeyError as exc:
        raise ZImageKeyError(f"is incomplete (no {exc.args[0]})") from None
    return {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": patch_in // 4, "dim": dim,
            "n_layers": _count(sd, "layers."), "n_refiner_layers": _count(sd, "noise_refiner."),
            "n_heads": dim // head_dim, "n_kv_heads": kv // head_dim, "norm_eps": 1e-5, "qk_norm": True,
            "cap_feat_dim": cap, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": rope_axes(head_dim),
            "axes_lens": [1024, 512, 512]}


# ---- LoRA files ------------------------------------------------------------------------------

def memory_to_file(module: str) -> str:
    """``lora_unet_layers_0_attention_to_q`` -> ``diffusion_model.layers.0.attention.to_q``."""
    found = _MEMORY.match(module)
    if found is None:
        raise ZImageKeyError(f"{module}: not a layer of a Z-Image transformer block")
    block, index, inner = found.groups()
    return f"{FILE_PREFIX}{block}.{index}.{_INNER[inner]}"


def to_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A network state dict in ComfyUI's Z-Image LoRA layout (text-encoder keys pass unchanged)."""
    out = {}
    for key, value in state_dict.items():
        module, dot, tensor = key.partition(".")
        out[(memory_to_file(module) if module.startswith("lora_unet_") else module) + dot + tensor] = value
    return out


def from_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_file`: ``diffusion_model.<path>.<tensor>`` back to in-memory names."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(FILE_PREFIX):
            out[key] = value
            continue
        found = _FILE.match(key)
        if found is None:
            raise ZImageKeyError(f"{key}: names no layer of a Z-Image transformer block")
        block, index, inner, tensor = found.groups()
        out[f"lora_unet_{block}_{index}_{inner.replace('.', '_')}.{tensor}"] = value
    return out
