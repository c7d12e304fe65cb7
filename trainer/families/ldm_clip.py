"""ldm (A1111) single-file text encoders to transformers CLIP models.

The ldm yaml only names a hub model for its text encoder, so the CLIP config is
read off the tensor shapes instead (heads = hidden // 64, the CLIP convention).
OpenAI CLIP-L uses quick_gelu, OpenCLIP-H/G use gelu.
"""
from __future__ import annotations

import re

import torch
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .checkpoint import ModelError
from .single_file import assign_load, build_empty

BOS, EOS = 49406, 49407
SD1_CLIP = "cond_stage_model.transformer."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")


def _layers(sd: dict, prefix: str) -> int:
    found = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len([i for i in found if i.isdigit()])


def _config(vocab: int, hidden: int, inter: int, layers: int, positions: int, act: str, proj: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions, hidden_act=act,
        projection_dim=proj, layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
    )


def clip_l_config(sd: dict, prefix: str, *, name: str, act: str = "quick_gelu") -> CLIPTextConfig:
    """CLIP text config from transformers-format `<prefix>text_model.*` shapes (OpenAI CLIP-L by default)."""
    p = prefix + "text_model."
    try:
        vocab, hidden = sd[p + "embeddings.token_embedding.weight"].shape
        proj = sd[prefix + "text_projection.weight"].shape[0] if prefix + "text_projection.weight" in sd else hidden
        return _config(vocab, hidden, sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                       _layers(sd, p + "encoder.layers."), sd[p + "embeddings.position_embedding.weight"].shape[0],
                       act, proj)
    except KeyError as exc:
        raise ModelError(f"{name}: incomplete CLIP text encoder (missing {exc.args[0]})") from exc


def open_clip_config(sd: dict, prefix: str, *, name: str, drop_last: bool) -> CLIPTextConfig:
    """OpenCLIP text config (SD2 H, SDXL bigG) from `<prefix>*` shapes."""
    try:
        vocab, hidden = sd[prefix + "token_embedding.weight"].shape
        layers = _layers(sd, prefix + "transformer.resblocks.") - (1 if drop_last else 0)
        proj = sd[prefix + "text_projection"].shape[1] if prefix + "text_projection" in sd else hidden
        return _config(vocab, hidden, sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                       layers, sd[prefix + "positional_embedding"].shape[0], "gelu", proj)
    except KeyError as exc:
        raise ModelError(f"{name}: incomplete OpenCLIP text encoder (missing {exc.args[0]})") from exc


def _fit_keys(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match converted `text_model.*` keys to the model at hand.

    transformers 5's CLIPTextModel has no `.text_model` level; position_ids is a
    buffer the model makes itself (old files may even hold it as floats); layers
    past the config's count are dropped (SD2 uses the penultimate layer).
    """
    expected = set(model.state_dict().keys())
    n_layers = model.config.num_hidden_layers
    out = {}
    for key, value in converted.items():
        if key.endswith("position_ids"):
            continue
        layer = _LAYER.match(key)
        if layer and int(layer.group(1)) >= n_layers:
            continue
        if key not in expected and key.startswith("text_model.") and key[len("text_model."):] in expected:
            key = key[len("text_model."):]
        out[key] = value
    return out


def _check_split(converted: dict, hidden: int, *, name: str) -> None:
    """diffusers splits OpenCLIP's fused q/k/v by a width it guesses; make sure it guessed right."""
    q = next((v for k, v in converted.items() if k.endswith("layers.0.self_attn.q_proj.weight")), None)
    if q is None or tuple(q.shape) != (hidden, hidden):
        shape = None if q is None else tuple(q.shape)
        raise ModelError(f"{name}: could not split the OpenCLIP attention weights (q_proj {shape})")


def clip_l_from_ldm(sd: dict[str, torch.Tensor], prefix: str, *, name: str) -> CLIPTextModel:
    """SD1's text encoder (prefix SD1_CLIP) or SDXL's CLIP-L (prefix SDXL_CLIP_L)."""
    cfg = clip_l_config(sd, prefix, name=name)
    part = {k: v for k, v in sd.items() if k.startswith(prefix)}
    converted = sfu.convert_ldm_clip_checkpoint(part)
    model = build_empty(lambda: CLIPTextModel(cfg))
    return assign_load(model, _fit_keys(model, converted), what="text encoder", name=name)


def hf_clip_from_state_dict(sd: dict[str, torch.Tensor], prefix: str, *, name: str, projection: bool,
                            act: str = "gelu") -> torch.nn.Module:
    """A text encoder already in transformers' layout under `prefix` (Forge keeps OpenCLIP-H/G so)."""
    cfg = clip_l_config(sd, prefix, name=name, act=act)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = build_empty(lambda: cls(cfg))
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not projection:
        part.pop("text_projection.weight", None)
    return assign_load(model, _fit_keys(model, part), what="text encoder", name=name)


def open_clip_from_ldm(sd: dict[str, torch.Tensor], prefix: str, *, name: str, projection: bool) -> torch.nn.Module:
    """SD2's OpenCLIP-H (penultimate layer, CLIPTextModel) or SDXL's bigG (with projection)."""
    cfg = open_clip_config(sd, prefix, name=name, drop_last=not projection)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = build_empty(lambda: cls(cfg))
    part = {k: v for k, v in sd.items() if k.startswith(prefix)}
    converted = sfu.convert_open_clip_checkpoint(model, part, prefix=prefix)
    if not projection:
        converted.pop("text_projection.weight", None)  # SD2 uses the hidden states, not the projection
    _check_split(converted, cfg.hidden_size, name=name)
    return assign_load(model, _fit_keys(model, converted), what="text encoder", name=name)


def text_encoders_from_ldm(sd: dict[str, torch.Tensor], family: str, *, name: str) -> list[torch.nn.Module]:
    """The family's text encoder(s), in ModelBundle order."""
    if family == "sd1":
        return [clip_l_from_ldm(sd, SD1_CLIP, name=name)]
    if family == "sd2":
        return [open_clip_from_ldm(sd, SD2_OPENCLIP, name=name, projection=False)]
    return [clip_l_from_ldm(sd, SDXL_CLIP_L, name=name),
            open_clip_from_ldm(sd, SDXL_OPENCLIP, name=name, projection=True)]
