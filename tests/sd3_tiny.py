"""Tiny random SD3 / SD3.5 parts built in code, and writers for the files users have.

Transformer: 3 joint blocks, 4 heads of 8 (width 32), q/k RMS norm; "5-medium" adds the MMDiT-X
second attention in block 0, "5-large" has none; "medium" (SD3) is one head of 64 without q/k norm. CLIP-L (quick GELU) and CLIP-G (GELU) are 16 wide
with projections, so their states side by side fill T5's width of 32 (flux_tiny's tiny T5).
Autoencoder: flux_tiny's 16-channel one with SD3's scaling and shift. The writers produce SAI's
single-file layout through our own inverse of diffusers' key conversion.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection

from tests.flux_tiny import T5_DIM, diffusers_vae_to_ldm, tiny_flux_ae, tiny_t5, tiny_t5_tokenizer
from tests.tiny import tiny_text_config
from trainer.families.sd3_load import VAE_SCALING, VAE_SHIFT, sd3_scheduler
from trainer.families.tokenizer import clip_tokenizer

CLIP_DIM = 16


def tiny_sd3_transformer(variant: str = "5-medium") -> SD3Transformer2DModel:
    """SD3 medium ("medium") has no q/k norm, so its file does not show the head width: one head of
    SD3's 64 here, as the loader assumes."""
    heads, width = (1, 64) if variant == "medium" else (4, 8)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=width, num_attention_heads=heads,
        joint_attention_dim=T5_DIM, caption_projection_dim=heads * width, pooled_projection_dim=2 * CLIP_DIM,
        out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,) if variant == "5-medium" else (),
        qk_norm=None if variant == "medium" else "rms_norm")


def tiny_clip(act: str) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(tiny_text_config(hidden=CLIP_DIM, act=act, projection=CLIP_DIM))


def tiny_sd3_parts(variant: str = "5-medium", seed: int = 0, t5: bool = True) -> dict:
    """Random tiny parts, fp32, eval mode, frozen (t5 None when asked for a model without it)."""
    torch.manual_seed(seed)
    vae = tiny_flux_ae()
    vae.register_to_config(scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT)
    parts = {"transformer": tiny_sd3_transformer(variant), "clip_l": tiny_clip("quick_gelu"),
             "clip_g": tiny_clip("gelu"), "t5xxl": tiny_t5() if t5 else None, "vae": vae}
    for m in parts.values():
        if m is not None:
            m.eval().requires_grad_(False)
    return parts


def tiny_sd3_bundle(variant: str = "5-medium", seed: int = 0, t5: bool = True):
    """The tiny parts as a ModelBundle of the SD3 family (what a loader hands the engine)."""
    from trainer.families.bundle import ModelBundle
    from trainer.families.sd3_files import NoT5

    p = tiny_sd3_parts(variant, seed, t5)
    return ModelBundle(family="sd3", unet=p["transformer"], vae=p["vae"],
                       text_encoders=[p["clip_l"], p["clip_g"], p["t5xxl"] if t5 else NoT5()],
                       tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), tiny_t5_tokenizer() if t5 else None],
                       noise_scheduler=sd3_scheduler(), name=f"tiny-sd3-{variant}", extra={"sd3_variant": variant})


# ---- SAI layout (the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers) ----------

_PLAIN = [("x_block.attn.proj", "attn.to_out.0"), ("x_block.attn2.proj", "attn2.to_out.0"),
          ("context_block.attn.proj", "attn.to_add_out"), ("x_block.mlp.fc1", "ff.net.0.proj"),
          ("x_block.mlp.fc2", "ff.net.2"), ("context_block.mlp.fc1", "ff_context.net.0.proj"),
          ("context_block.mlp.fc2", "ff_context.net.2"), ("x_block.adaLN_modulation.1", "norm1.linear"),
          ("context_block.adaLN_modulation.1", "norm1_context.linear")]
_NORMS = [("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
          ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")]
_QKV = [("x_block.attn.qkv", "attn.to_{}"), ("context_block.attn.qkv", "attn.add_{}_proj"),
        ("x_block.attn2.qkv", "attn2.to_{}")]
_TOP = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")]


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_sai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAI key layout of a diffusers SD3Transformer2DModel state dict; every tensor is used once."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def put(sai: str, dif: str, fn=lambda t: t) -> None:
        for p in ("weight", "bias"):
            if f"{dif}.{p}" in sd:
                used.add(f"{dif}.{p}")
                out[f"{sai}.{p}"] = fn(sd[f"{dif}.{p}"])

    out["pos_embed"] = sd["pos_embed.pos_embed"]
    used.add("pos_embed.pos_embed")
    for sai, dif in _TOP:
        put(sai, dif)
    put("final_layer.adaLN_modulation.1", "norm_out.linear", _swap)
    n = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n):
        b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for sai, dif in _PLAIN:
            last_mod = i == n - 1 and dif == "norm1_context.linear"
            put(b + sai, d + dif, _swap if last_mod else (lambda t: t))
        for sai, dif in _NORMS:
            if f"{d}{dif}.weight" in sd:
                used.add(f"{d}{dif}.weight")
                out[f"{b}{sai}.weight"] = sd[f"{d}{dif}.weight"]
        for sai, dif in _QKV:
            for p in ("weight", "bias"):
                names = [f"{d}{dif.format(x)}.{p}" for x in "qkv"]
                if names[0] in sd:
                    used.update(names)
                    out[f"{b}{sai}.{p}"] = torch.cat([sd[k] for k in names])
    left = set(sd) - used
    assert not left, f"diffusers keys without a SAI name: {sorted(left)[:5]}"
    return out


def clip_state_dict(model: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """ComfyUI clip_l / clip_g layout: transformers 4 names (`text_model.*`) and text_projection."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_sd3_single(parts: dict, path: Path, *, with_encoders: bool = True) -> Path:
    """A SAI single file: `model.diffusion_model.*`, and with_encoders its CLIPs, T5 (when there is
    one) and autoencoder under SAI's prefixes."""
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_to_sai(parts["transformer"].state_dict()).items()}
    if with_encoders:
        for role in ("clip_l", "clip_g"):
            sd.update({f"text_encoders.{role}.transformer.{k}": v for k, v in clip_state_dict(parts[role]).items()})
        if parts["t5xxl"] is not None:
            sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in parts["t5xxl"].state_dict().items()
                       if k != "encoder.embed_tokens.weight"})
        sd.update({"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(parts["vae"]).items()})
    return _save(sd, path)


def save_sd3_components(parts: dict, folder: Path) -> dict[str, Path]:
    """The separate clip_l, clip_g, t5xxl and ae files (ComfyUI layouts), and T5's tokenizer.json."""
    out = {role: _save(clip_state_dict(parts[role]), folder / f"{role}.safetensors") for role in ("clip_l", "clip_g")}
    out["t5xxl"] = _save({k: v for k, v in parts["t5xxl"].state_dict().items() if k != "encoder.embed_tokens.weight"},
                         folder / "t5xxl_fp16.safetensors")
    out["ae"] = _save(diffusers_vae_to_ldm(parts["vae"]), folder / "ae.safetensors")
    tiny_t5_tokenizer()._tokenizer.save(str(folder / "tokenizer.json"))
    return out


def save_sd3_folder(parts: dict, folder: Path) -> Path:
    """A diffusers folder as StableDiffusion3Pipeline.save_pretrained lays it out."""
    parts["transformer"].save_pretrained(str(folder / "transformer"))
    parts["clip_l"].save_pretrained(str(folder / "text_encoder"))
    parts["clip_g"].save_pretrained(str(folder / "text_encoder_2"))
    parts["t5xxl"].save_pretrained(str(folder / "text_encoder_3"))
    parts["vae"].save_pretrained(str(folder / "vae"))
    clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    clip_tokenizer("!").save_pretrained(str(folder / "tokenizer_2"))
    tiny_t5_tokenizer().save_pretrained(str(folder / "tokenizer_3"))
    sd3_scheduler().save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}), encoding="utf-8")
    return folder


@torch.no_grad()
def sd3_forward(model: SD3Transformer2DModel, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                 encoder_hidden_states=torch.randn(1, 6, T5_DIM, generator=g),
                 pooled_projections=torch.randn(1, 2 * CLIP_DIM, generator=g),
                 timestep=torch.tensor([500.0]), return_dict=False)[0]
