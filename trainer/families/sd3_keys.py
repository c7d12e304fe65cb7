"""SD3 / SD3.5 LoRA key layout: the network's diffusers names <-> the names written to files.

In memory (LyCORIS on diffusers' ``SD3Transformer2DModel``) a module is ``lora_unet_<diffusers
path, '.' -> '_'>`` (``lora_unet_transformer_blocks_0_attn_to_q``); the text encoders are
``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G) and ``lora_te3_`` (T5-XXL), which are already
sd-scripts' names and pass through unchanged.

Files:

* **Plain LoRA**: the SAI (MMDiT) layout that sd-scripts' networks/lora_sd3.py writes and ComfyUI
  reads (``lora_unet_`` + the original weight name): ``lora_unet_joint_blocks_{i}_x_block_attn_qkv``,
  ``..._context_block_attn_qkv``, ``..._x_block_attn2_qkv`` (SD3.5 medium's second attention),
  ``..._attn_proj``, ``..._mlp_fc1``, ``..._mlp_fc2``, ``..._adaLN_modulation_1``. The q/k/v parts
  are fused as flux_keys.py fuses FLUX's (downs stacked and ups block-diagonal; a down shared by
  the parts is written once with the ups stacked, sd-scripts' layout without split_qkv). The last
  block's context modulation is [shift, scale] in SAI's model and [scale, shift] in diffusers'
  (AdaLayerNormContinuous): its up rows are swapped, as diffusers' own single-file converter swaps
  the weight.
* **LoKr, LoHa, DoRA, anything else**: the parts cannot be fused, so the file has
  ``lora_transformer_<diffusers path>`` and the tensors unchanged (the naming ComfyUI's SD3 key
  map reads besides the SAI one).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from .flux_keys import _groups, _is_plain_lora, fused_from_file, fused_to_file

UNFUSED_PREFIX = "lora_transformer_"
TE_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_")
Groups = dict[str, dict[str, torch.Tensor]]

# diffusers path inside a JointTransformerBlock -> (SAI name inside the block, part, parts)
BLOCK = {
    "attn_to_q": ("x_block_attn_qkv", 0, 3), "attn_to_k": ("x_block_attn_qkv", 1, 3),
    "attn_to_v": ("x_block_attn_qkv", 2, 3), "attn_to_out_0": ("x_block_attn_proj", 0, 1),
    "attn_add_q_proj": ("context_block_attn_qkv", 0, 3), "attn_add_k_proj": ("context_block_attn_qkv", 1, 3),
    "attn_add_v_proj": ("context_block_attn_qkv", 2, 3), "attn_to_add_out": ("context_block_attn_proj", 0, 1),
    "attn2_to_q": ("x_block_attn2_qkv", 0, 3), "attn2_to_k": ("x_block_attn2_qkv", 1, 3),
    "attn2_to_v": ("x_block_attn2_qkv", 2, 3), "attn2_to_out_0": ("x_block_attn2_proj", 0, 1),
    "ff_net_0_proj": ("x_block_mlp_fc1", 0, 1), "ff_net_2": ("x_block_mlp_fc2", 0, 1),
    "ff_context_net_0_proj": ("context_block_mlp_fc1", 0, 1), "ff_context_net_2": ("context_block_mlp_fc2", 0, 1),
    "norm1_linear": ("x_block_adaLN_modulation_1", 0, 1),
    "norm1_context_linear": ("context_block_adaLN_modulation_1", 0, 1),
}
_CONTEXT_MOD = "context_block_adaLN_modulation_1"


def sai_place(name: str) -> tuple[str, int, int]:
    """(file module name, part index, number of parts) of an in-memory ``lora_unet_`` name."""
    m = re.fullmatch(r"lora_unet_transformer_blocks_(\d+)_(.+)", name)
    if m and m[2] in BLOCK:
        sub, part, parts = BLOCK[m[2]]
        return f"lora_unet_joint_blocks_{m[1]}_{sub}", part, parts
    raise ValueError(f"{name}: no SD3 (SAI joint block) module for this network module")


def members(file_name: str) -> list[str]:
    """In-memory names of the parts of a SAI file module, in part order."""
    m = re.fullmatch(r"lora_unet_joint_blocks_(\d+)_(.+)", file_name)
    found = sorted((part, sub) for sub, (file_sub, part, _) in BLOCK.items() if m and file_sub == m[2])
    if not found:
        raise ValueError(f"{file_name}: not an SD3 (SAI joint block) LoRA module name")
    return [f"lora_unet_transformer_blocks_{m[1]}_{sub}" for _, sub in found]


def _pre_only_modulation(file_name: str, group: Mapping[str, torch.Tensor]) -> bool:
    """The last block's context modulation: 2 × width outputs (shift, scale) where the others have 6."""
    if not file_name.endswith(_CONTEXT_MOD) or "lora_up.weight" not in group:
        return False
    return group["lora_up.weight"].shape[0] == 2 * group["lora_down.weight"].shape[1]


def to_file(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's state dict (diffusers names) in the SD3 file layout (see module doc)."""
    return fused_to_file(sd, place=sai_place, te_name=lambda name: name, swapped=_pre_only_modulation,
                         label="SD3")


def from_file(sd: Mapping[str, torch.Tensor],
              target: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """An SD3 LoRA file (this layout or sd-scripts') in the network's names; `target` (the
    network's {key: shape}) settles each fused part's rank, as flux_keys.from_file does."""
    return fused_from_file(sd, target, te_prefixes=TE_PREFIXES, te_name=lambda name, _: name, place=sai_place,
                           members=members, swapped=_pre_only_modulation, label="SD3")


def fused_groups(lora_names: Sequence[str]) -> list[list[str]]:
    """In-memory network module names grouped by the fused SAI layer (q/k/v) they are parts of."""
    by_file: dict[str, list[tuple[int, str]]] = {}
    for name in lora_names:
        if name.startswith("lora_unet_"):
            file_name, part, parts = sai_place(name)
            if parts > 1:
                by_file.setdefault(file_name, []).append((part, name))
    return [[n for _, n in sorted(m)] for m in by_file.values() if len(m) > 1]


def to_diffusers(file_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain-LoRA SD3 file as the PEFT state dict diffusers' ``StableDiffusion3Pipeline
    .load_lora_weights`` reads (``transformer.<path>.lora_A/lora_B.weight``, alpha folded into B):
    diffusers 0.31-0.42 convert no kohya SD3 keys themselves."""
    out: dict[str, torch.Tensor] = {}
    prefixes = {"lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}
    for name, group in _groups(from_file(file_sd)).items():
        if not _is_plain_lora(group):
            raise ValueError(f"{name}: diffusers reads plain LoRA (lora_down/lora_up/alpha) only")
        down, up = group["lora_down.weight"], group["lora_up.weight"]
        scale = float(group.get("alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
        if name.startswith("lora_unet_"):
            path = "transformer." + _diffusers_path(name[len("lora_unet_"):])
        elif name[:len("lora_te1_")] in prefixes:
            path = prefixes[name[:len("lora_te1_")]] + _clip_path(name[len("lora_te1_"):])
        else:
            raise ValueError(f"{name}: diffusers' SD3 loader has no T5 LoRA")
        out[f"{path}.lora_A.weight"] = down
        out[f"{path}.lora_B.weight"] = up * scale
    return out


def _diffusers_path(flat: str) -> str:
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", flat)
    if not m or m[2] not in BLOCK:
        raise ValueError(f"{flat}: not a joint block module")
    sub = {"attn_to_out_0": "attn.to_out.0", "attn2_to_out_0": "attn2.to_out.0", "ff_net_0_proj": "ff.net.0.proj",
           "ff_net_2": "ff.net.2", "ff_context_net_0_proj": "ff_context.net.0.proj",
           "ff_context_net_2": "ff_context.net.2", "norm1_linear": "norm1.linear",
           "norm1_context_linear": "norm1_context.linear"}.get(m[2])
    if sub is None:
        head, _, tail = m[2].partition("_")
        sub = f"{head}.{tail}"  # attn_to_q -> attn.to_q, attn_add_q_proj -> attn.add_q_proj
    return f"transformer_blocks.{m[1]}.{sub}"


def _clip_path(flat: str) -> str:
    m = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(.+)", flat)
    if not m:
        raise ValueError(f"{flat}: not a CLIP attention or MLP layer")
    return f"text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}"
