"""FLUX.1 LoRA key layout: the network's diffusers names <-> the names written to files.

In memory (LyCORIS on diffusers' ``FluxTransformer2DModel``) a module is ``lora_unet_<diffusers
path, '.' -> '_'>`` (``lora_unet_transformer_blocks_0_attn_to_q``); text encoders ``lora_te[12]_``.
Files use one transformer layout per network (diffusers drops ``lora_unet_`` keys from a file
that also has ``lora_transformer_`` LoRA keys):

* **Plain LoRA** (only ``lora_down.weight``/``lora_up.weight``/``alpha``): kohya's BFL names as
  sd-scripts' networks/lora_flux.py writes them (``lora_unet_double_blocks_{i}_img_attn_qkv``,
  ``lora_unet_single_blocks_{i}_linear1``...). Parts that BFL fuses (to_q/k/v -> img_attn_qkv,
  add_q/k/v_proj -> txt_attn_qkv, single to_q/k/v + proj_mlp -> linear1) are stored like
  sd-scripts' ``split_qkv`` state dict: downs stacked (rank R = sum of part ranks), up
  block-diagonal. sd-scripts keeps the part alpha there, and every consumer divides it by R,
  so its split files apply at 1/3 (linear1: 1/4) of the trained scale; here alpha = scale * R,
  so up @ down * alpha / R is exactly each part's delta (unequal part scales are folded into
  their up blocks). Parts that share one down (``split_qkv`` off, sd-scripts' default) are
  written as sd-scripts writes them then: that down, the ups stacked, alpha unchanged.
  ``final_layer_adaLN_modulation_1`` (``norm_out.linear``) is [shift, scale]
  in BFL, [scale, shift] in diffusers: its up rows are swapped.
  Read by sd-scripts, ComfyUI and Forge (``lora_unet_`` + BFL weight name), and by diffusers'
  ``FluxPipeline.load_lora_weights`` (``_convert_kohya_flux_lora_to_diffusers``): it splits
  linear1 only at FLUX.1's widths (3072 x 3 + 12288) and reads only the blocks and
  ``lora_te1_``: 0.31 refuses other keys, 0.42 loads nothing of them (embedders, final_layer,
  T5) and warns.
* **LoKr, LoHa, DoRA (``dora_scale``), anything else**: these cannot be fused, so the file has
  ``lora_transformer_<diffusers path>`` and the tensors unchanged. ComfyUI (comfy/lora.py
  ``model_lora_keys_unet``, Flux branch) and Forge (packages_3rdparty/comfyui_lora_collection/
  lora.py, same function) map those names through ``flux_to_diffusers`` onto the BFL weights
  with row offsets (and the scale/shift swap) and apply lora/loha/lokr/DoRA patches to the
  slice. diffusers' FLUX loader reads none of these algorithms.

Text encoders: CLIP-L -> ``lora_te1_text_model_...``, T5 -> ``lora_te3_encoder_...`` (sd-scripts'
names, read by ComfyUI and Forge), whatever prefix the network used.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch

LORA_KEYS = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
UNFUSED_PREFIX = "lora_transformer_"
_SWAPPED = "final_layer_adaLN_modulation_1"
_TE_FILE = {"text_model_": "lora_te1_", "encoder_": "lora_te3_"}  # CLIP-L, T5 module paths
_TE_MEMORY = {"lora_te1_": "lora_te1_", "lora_te3_": "lora_te2_"}  # defaults without a target

Groups = dict[str, dict[str, torch.Tensor]]

# diffusers path inside a block -> (BFL name inside the block, part, parts): the layout of
# diffusers' FLUX single-file conversion (BFL qkv rows are q, k, v; linear1 is q, k, v, mlp).
BLOCK_DOUBLE = {
    "attn_to_q": ("img_attn_qkv", 0, 3), "attn_to_k": ("img_attn_qkv", 1, 3), "attn_to_v": ("img_attn_qkv", 2, 3),
    "attn_add_q_proj": ("txt_attn_qkv", 0, 3), "attn_add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn_add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn_to_out_0": ("img_attn_proj", 0, 1), "attn_to_add_out": ("txt_attn_proj", 0, 1),
    "ff_net_0_proj": ("img_mlp_0", 0, 1), "ff_net_2": ("img_mlp_2", 0, 1),
    "ff_context_net_0_proj": ("txt_mlp_0", 0, 1), "ff_context_net_2": ("txt_mlp_2", 0, 1),
    "norm1_linear": ("img_mod_lin", 0, 1), "norm1_context_linear": ("txt_mod_lin", 0, 1),
}
BLOCK_SINGLE = {
    "attn_to_q": ("linear1", 0, 4), "attn_to_k": ("linear1", 1, 4), "attn_to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm_linear": ("modulation_lin", 0, 1),
}
# Outside the blocks: sd-scripts trains img/txt/time/vector/guidance_in (its ``in_dims``);
# final_layer is named as the BFL model names it (ComfyUI, Forge and diffusers read it).
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed_timestep_embedder_linear_1": "time_in_in_layer",
    "time_text_embed_timestep_embedder_linear_2": "time_in_out_layer",
    "time_text_embed_text_embedder_linear_1": "vector_in_in_layer",
    "time_text_embed_text_embedder_linear_2": "vector_in_out_layer",
    "time_text_embed_guidance_embedder_linear_1": "guidance_in_in_layer",
    "time_text_embed_guidance_embedder_linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear", "norm_out_linear": "final_layer_adaLN_modulation_1",
}


def _groups(sd: Mapping[str, torch.Tensor]) -> Groups:
    """{module name: {key suffix: tensor}}: a key is ``<module>.<suffix>``."""
    out: Groups = {}
    for key, value in sd.items():
        module, dot, suffix = key.partition(".")
        if not dot:
            raise ValueError(f"{key}: a LoRA key is '<module>.<tensor>'")
        out.setdefault(module, {})[suffix] = value
    return out


def _flat(groups: Groups) -> dict[str, torch.Tensor]:
    return {f"{m}.{s}": t for m, g in groups.items() for s, t in g.items()}

def _is_plain_lora(group: Mapping[str, torch.Tensor]) -> bool:
    return set(group) <= LORA_KEYS and "lora_down.weight" in group and group["lora_down.weight"].ndim == 2


def bfl_place(name: str) -> tuple[str, int, int]:
    """(file module name, part index, number of parts) of an in-memory ``lora_unet_`` name."""
    rest = name[len("lora_unet_"):] if name.startswith("lora_unet_") else None
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)", rest or "")
    if m:
        table, block = (BLOCK_SINGLE, "single_blocks") if m[1].startswith("single") else (BLOCK_DOUBLE, "double_blocks")
        if m[3] in table:
            file_sub, part, parts = table[m[3]]
            return f"lora_unet_{block}_{m[2]}_{file_sub}", part, parts
    elif rest in TOP:
        return f"lora_unet_{TOP[rest]}", 0, 1
    raise ValueError(f"{name}: no FLUX.1 (BFL) module for this network module")


def _members(file_name: str) -> list[str]:
    """In-memory names of the parts of a BFL file module, in part order."""
    rest = file_name[len("lora_unet_"):]
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", rest)
    if m:
        table, block = (BLOCK_DOUBLE, "transformer_blocks") if m[1] == "double_blocks" else \
            (BLOCK_SINGLE, "single_transformer_blocks")
        found = sorted((part, sub) for sub, (file_sub, part, _) in table.items() if file_sub == m[3])
        if found:
            return [f"lora_unet_{block}_{m[2]}_{sub}" for _, sub in found]
    for sub, file_sub in TOP.items():
        if file_sub == rest:
            return [f"lora_unet_{sub}"]
    raise ValueError(f"{file_name}: not a FLUX.1 (BFL) LoRA module name")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is [shift, scale]; diffusers' norm_out.linear is [scale, shift]."""
    return torch.cat([t[t.shape[0] // 2:], t[:t.shape[0] // 2]], dim=0)


def _te_file_name(name: str) -> str:
    prefix, _, rest = name.partition("_te")
    rest = rest.lstrip("0123456789").removeprefix("_")
    for start, file_prefix in _TE_FILE.items():
        if rest.startswith(start):
            return file_prefix + rest
    raise ValueError(f"{name}: neither a CLIP-L (text_model_...) nor a T5 (encoder_...) module")


def to_file(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's state dict (diffusers names) in the FLUX.1 file layout (see module doc)."""
    return fused_to_file(sd, place=bfl_place, te_name=_te_file_name, label="FLUX.1",
                         swapped=lambda file_name, group: file_name.endswith(_SWAPPED))


def fused_to_file(sd: Mapping[str, torch.Tensor], *, place: Callable[[str], tuple[str, int, int]],
                  te_name: Callable[[str], str], swapped: Callable[[str, dict], bool],
                  label: str) -> dict[str, torch.Tensor]:
    """A transformer network's state dict in an original-model file layout (FLUX.1's BFL, SD3's SAI):
    `place` gives a module's (file module, part, parts), `te_name` a text-encoder module's file
    name, `swapped` which single modules hold [shift, scale] where diffusers has [scale, shift].
    A network with any other algorithm than plain LoRA keeps diffusers paths (UNFUSED_PREFIX)."""
    groups = _groups(sd)
    out: Groups = {}
    unet = {n: g for n, g in groups.items() if n.startswith("lora_unet_")}
    for name, group in groups.items():
        if name.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")):
            out[te_name(name)] = dict(group)
        elif name not in unet:
            raise ValueError(f"{name}: not a {label} network module (lora_unet_ or lora_te*_)")
    if not all(_is_plain_lora(g) for g in unet.values()):
        for name, group in unet.items():
            place(name)  # refuse names that consumers could not map
            out[UNFUSED_PREFIX + name[len("lora_unet_"):]] = dict(group)
        return _flat(out)
    by_file: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    counts: dict[str, int] = {}
    for name, group in unet.items():
        file_name, part, parts = place(name)
        by_file.setdefault(file_name, {})[part] = group
        counts[file_name] = parts
    for file_name, parts in by_file.items():
        if counts[file_name] > 1:
            shared = shared_down(parts, counts[file_name])
            out[file_name] = shared if shared is not None else fuse(file_name, parts, counts[file_name])
            continue
        group = dict(parts[0])
        if swapped(file_name, group):
            group["lora_up.weight"] = _swap_halves(group["lora_up.weight"])
        out[file_name] = group
    return _flat(out)


def from_file(sd: Mapping[str, torch.Tensor],
              target: Mapping[str, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """A FLUX.1 LoRA file (this layout, sd-scripts' or another kohya BFL file) in the network's names.

    `target` is the network's own {state-dict key: shape}, when there is one: it gives each
    fused part's rank and the text encoders' in-memory prefixes. Without it, a fused module
    whose up is block-diagonal in equal rank blocks is split into parts of rank R / parts
    (inverse of `to_file`); any other fused module (sd-scripts without ``split_qkv``: one
    dense rank-R LoRA on qkv) gives every part the whole down and its rows of up, each of
    rank R and alpha unchanged. Both give exactly the file's delta weight.
    """
    return fused_from_file(sd, target, te_prefixes=("lora_te1_", "lora_te3_"), te_name=_te_memory_name,
                           place=bfl_place, members=_members, label="FLUX.1",
                           swapped=lambda name, group: name.endswith(_SWAPPED))


def fused_from_file(sd: Mapping[str, torch.Tensor], target: Mapping[str, Sequence[int]] | None, *,
                    te_prefixes: tuple[str, ...], te_name: Callable[[str, Mapping | None], str],
                    place: Callable[[str], tuple[str, int, int]], members: Callable[[str], list[str]],
                    swapped: Callable[[str, dict], bool], label: str) -> dict[str, torch.Tensor]:
    """The inverse of `fused_to_file`: `members` lists a file module's in-memory parts, `te_name` maps a
    text-encoder module to its in-memory name, `swapped` says which single modules hold [shift, scale]."""
    out: Groups = {}
    for name, group in _groups(sd).items():
        if name.startswith(te_prefixes):
            out[te_name(name, target)] = dict(group)
        elif name.startswith(UNFUSED_PREFIX):
            memory = "lora_unet_" + name[len(UNFUSED_PREFIX):]
            place(memory)  # refuses a name no consumer could map
            out[memory] = dict(group)
        elif name.startswith("lora_unet_"):
            parts = members(name)
            if len(parts) > 1:
                out.update(split(name, group, parts, target))
                continue
            group = dict(group)
            if swapped(name, group):
                if not _is_plain_lora(group):
                    raise ValueError(f"{name}: only a plain LoRA can be read on a modulation whose halves the "
                                     f"file swaps")
                group["lora_up.weight"] = _swap_halves(group["lora_up.weight"])
            out[parts[0]] = group
        else:
            raise ValueError(f"{name}: not a {label} LoRA module (lora_unet_, {UNFUSED_PREFIX}, "
                             f"{', '.join(te_prefixes)})")
    return _flat(out)


def _te_memory_name(name: str, target: Mapping[str, Sequence[int]] | None) -> str:
    file_prefix, rest = name[:len("lora_te1_")], name[len("lora_te1_"):]
    if target is not None:
        for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
            if any(k.startswith(f"{prefix}{rest}.") for k in target):
                return prefix + rest
    return _TE_MEMORY[file_prefix] + rest


def shared_down(parts: Mapping[int, Mapping[str, torch.Tensor]], count: int) -> dict[str, torch.Tensor] | None:
    """sd-scripts' layout without split_qkv (one rank-r LoRA on the fused layer: the down, the ups
    stacked), when every part is there with the same down and alpha; else None."""
    if sorted(parts) != list(range(count)):
        return None
    ref = parts[0]
    same = all(torch.equal(parts[j]["lora_down.weight"], ref["lora_down.weight"])
               and "alpha" in parts[j] and float(parts[j]["alpha"]) == float(ref.get("alpha", -1)) for j in parts)
    if not same:
        return None
    return {"lora_down.weight": ref["lora_down.weight"],
            "lora_up.weight": torch.cat([parts[j]["lora_up.weight"] for j in range(count)]),
            "alpha": ref["alpha"]}


def fuse(file_name: str, parts: Mapping[int, Mapping[str, torch.Tensor]], count: int) -> dict[str, torch.Tensor]:
    """One BFL LoRA from the LoRAs of its parts: downs stacked, ups block-diagonal, alpha = scale * R.

    A part without a LoRA gets zero rows (FLUX's q/k/v are as wide as the model, its MLP 4x).
    """
    present = sorted(parts)
    ref = parts[present[0]]
    for j in present:
        if "alpha" not in parts[j] or parts[j]["lora_down.weight"].shape[1] != ref["lora_down.weight"].shape[1]:
            raise ValueError(f"{file_name}: part {j} needs an alpha and the same input width as the others")
    in_dim = ref["lora_down.weight"].shape[1]
    outs = [parts[j]["lora_up.weight"].shape[0] if j in parts else (4 * in_dim if j == 3 else in_dim)
            for j in range(count)]
    ranks = {j: parts[j]["lora_down.weight"].shape[0] for j in present}
    total, a_ref, r_ref = sum(ranks.values()), float(ref["alpha"]), ranks[present[0]]
    if a_ref == 0:
        raise ValueError(f"{file_name}: alpha 0 has no scale to keep")
    up = ref["lora_up.weight"].new_zeros((sum(outs), total))
    row = col = 0
    for j in range(count):
        if j in parts:
            block, r = parts[j]["lora_up.weight"], ranks[j]
            ratio = float(parts[j]["alpha"]) * r_ref / (r * a_ref)  # this part's scale / the file's
            up[row:row + outs[j], col:col + r] = block if ratio == 1.0 else block * ratio
            col += r
        row += outs[j]
    return {"lora_down.weight": torch.cat([parts[j]["lora_down.weight"] for j in present]),
            "lora_up.weight": up,
            "alpha": torch.tensor(a_ref * total / r_ref, dtype=ref["alpha"].dtype)}


def _part_dims(file_name: str, out_dim: int, in_dim: int, count: int) -> list[int]:
    if count == 4 and out_dim > 3 * in_dim:
        return [in_dim] * 3 + [out_dim - 3 * in_dim]
    if count == 3 and out_dim % 3 == 0:
        return [out_dim // 3] * 3
    raise ValueError(f"{file_name}: output width {out_dim} does not split into {count} FLUX parts")


def _off_block_zero(up: torch.Tensor, outs: list[int], ranks: list[int], shared: bool = False) -> bool:
    """Whether each part's rows of `up` are zero outside its own rank columns (all columns
    when the down is shared; a part of rank 0 owns none)."""
    row = col = 0
    for out, r in zip(outs, ranks):
        rows = up[row:row + out]
        if shared and r == 0 and rows.any():
            return False
        if not shared and (rows[:, :col].any() or rows[:, col + r:].any()):
            return False
        row, col = row + out, col + r
    return True


def _part_ranks(file_name: str, up: torch.Tensor, outs: list[int], members: list[str],
                target: Mapping[str, Sequence[int]] | None) -> tuple[list[int], bool]:
    """(rank of each part, whether the down is shared rather than split)."""
    total, n = up.shape[1], len(members)
    if target is None:
        if total % n == 0 and _off_block_zero(up, outs, [total // n] * n):
            return [total // n] * n, False
        return [total] * n, True
    ranks = [int(target[f"{m}.lora_down.weight"][0]) if f"{m}.lora_down.weight" in target else 0 for m in members]
    if sum(ranks) == total and _off_block_zero(up, outs, ranks):
        return ranks, False
    if any(ranks) and all(r in (0, total) for r in ranks) and _off_block_zero(up, outs, ranks, shared=True):
        return ranks, True
    raise ValueError(f"{file_name}: rank {total} LoRA cannot be split exactly into the network's "
                     f"ranks {dict(zip(members, ranks))}")


def split(file_name: str, group: Mapping[str, torch.Tensor], members: list[str],
          target: Mapping[str, Sequence[int]] | None) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRAs of a fused BFL module's parts; their deltas are exactly the file's delta rows."""
    if not _is_plain_lora(group) or "lora_up.weight" not in group:
        raise ValueError(f"{file_name}: a fused FLUX module can only be split from a plain LoRA "
                         f"(lora_down/lora_up/alpha), found {sorted(group)}")
    down, up = group["lora_down.weight"], group["lora_up.weight"]
    total = down.shape[0]
    alpha = group.get("alpha", torch.tensor(float(total)))
    outs = _part_dims(file_name, up.shape[0], down.shape[1], len(members))
    ranks, shared = _part_ranks(file_name, up, outs, members, target)
    out: dict[str, dict[str, torch.Tensor]] = {}
    row = col = 0
    for member, rows, r in zip(members, outs, ranks):
        if r:
            cols = slice(0, total) if shared else slice(col, col + r)
            out[member] = {"lora_down.weight": down[cols].clone(), "lora_up.weight": up[row:row + rows, cols].clone(),
                           "alpha": torch.tensor(float(alpha) * r / total, dtype=alpha.dtype)}
        row, col = row + rows, col + (0 if shared else r)
    return out
