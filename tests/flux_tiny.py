"""Tiny random FLUX.1 parts built in code, and writers for the files users have.

Transformer: 2 double + 2 single blocks, 2 heads of 32 (rotary axes 4/14/14, FLUX.1's 1/8-then-halves
split of its 128), guidance embedder for dev only. CLIP-L: tests/tiny.py's tiny text config. T5: a
gated-GELU encoder with a small Unigram tokenizer made here. Autoencoder: 16 latent channels, no quant
convs, widening channels (so shortcut convs exist, as in FLUX.1's), its scaling and shift factors.
The writers produce BFL/ComfyUI layouts through our own inverse of diffusers' key conversion.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from tests.tiny import tiny_text_config
from trainer.families.flux_load import AE_SCALING, AE_SHIFT, flux_scheduler
from trainer.families.tokenizer import clip_tokenizer

T5_DIM = 32
T5_WORDS = ("a photo of the cat dog on red blue green sitting table with in at sks person style "
            "painting drawing picture man woman tree house car").split()


def t5_tokenizer_object():
    """A `tokenizers` Unigram tokenizer with T5's special ids (pad 0, </s> 1, <unk> 2) and its </s> suffix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0 - i * 0.01) for i, w in enumerate(T5_WORDS)]
    pieces += [("▁", -5.0)] + [(c, -6.0) for c in letters + list("0123456789.,!?'-")]
    tok = Tokenizer(models.Unigram(pieces, 2))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])  # listed as special, as T5's tokenizer.json lists them
    try:  # tokenizers >= 0.19 replaced add_prefix_space with prepend_scheme
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    except TypeError:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", add_prefix_space=True)
        tok.decoder = decoders.Metaspace(replacement="▁", add_prefix_space=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return tok


def tiny_t5_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=t5_tokenizer_object(), eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_t5() -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=t5_tokenizer_object().get_vocab_size(), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    cfg.dense_act_fn = "gelu_pytorch_tanh"  # FLUX.1's text_encoder_2 config
    return T5EncoderModel(cfg)


def tiny_flux_transformer(variant: str = "dev") -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=tiny_text_config().hidden_size,
        guidance_embeds=variant == "dev", axes_dims_rope=(4, 14, 14))


def tiny_flux_ae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        norm_num_groups=32, sample_size=1024, scaling_factor=AE_SCALING, shift_factor=AE_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


@dataclass
class TinyFlux:
    transformer: FluxTransformer2DModel
    clip_l: CLIPTextModel
    t5xxl: T5EncoderModel
    vae: AutoencoderKL
    variant: str


def tiny_flux(variant: str = "dev", seed: int = 0) -> TinyFlux:
    """Random tiny FLUX.1 parts, fp32, eval mode, frozen."""
    torch.manual_seed(seed)
    parts = TinyFlux(tiny_flux_transformer(variant), CLIPTextModel(tiny_text_config()), tiny_t5(),
                     tiny_flux_ae(), variant)
    for m in (parts.transformer, parts.clip_l, parts.t5xxl, parts.vae):
        m.eval().requires_grad_(False)
    return parts


def _pairs(bfl: str, dif: str) -> list[tuple[str, str]]:
    return [(f"{bfl}.weight", f"{dif}.weight"), (f"{bfl}.bias", f"{dif}.bias")]


def _shift_scale(t: torch.Tensor) -> torch.Tensor:
    """diffusers keeps the final modulation as (scale, shift), BFL as (shift, scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL key layout of a diffusers FluxTransformer2DModel state dict; every tensor is used once."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    out: dict[str, torch.Tensor] = {}
    plain = [("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
             ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out")]
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        plain += [("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                  ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        plain += [(b + "img_mod.lin", d + "norm1.linear"), (b + "txt_mod.lin", d + "norm1_context.linear"),
                  (b + "img_mlp.0", d + "ff.net.0.proj"), (b + "img_mlp.2", d + "ff.net.2"),
                  (b + "txt_mlp.0", d + "ff_context.net.0.proj"), (b + "txt_mlp.2", d + "ff_context.net.2"),
                  (b + "img_attn.proj", d + "attn.to_out.0"), (b + "txt_attn.proj", d + "attn.to_add_out")]
        for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for p in ("weight", "bias"):
                out[f"{b}{side}_attn.qkv.{p}"] = torch.cat([take(f"{d}attn.{n}.{p}") for n in names])
        for bfl, dif in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                         ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{b}{bfl}.scale"] = take(f"{d}attn.{dif}.weight")
    for i in range(n_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        plain += [(b + "modulation.lin", d + "norm.linear"), (b + "linear2", d + "proj_out")]
        for p in ("weight", "bias"):
            out[f"{b}linear1.{p}"] = torch.cat([take(f"{d}{n}.{p}") for n in
                                                ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        out[b + "norm.query_norm.scale"] = take(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = take(d + "attn.norm_k.weight")
    for bfl, dif in plain:
        for bk, dk in _pairs(bfl, dif):
            out[bk] = take(dk)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _shift_scale(take(f"norm_out.linear.{p}"))
    left = set(sd) - used
    assert not left, f"diffusers keys without a BFL name: {sorted(left)[:5]}"
    return out


def _vae_name(key: str, levels: int) -> str:
    """One diffusers AutoencoderKL key in ldm (BFL ae.safetensors) naming."""
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    name = ".".join(rest)
    reps = [("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
            ("mid_block.resnets.1", "mid.block_2"),
            ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"), ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
            ("mid_block.attentions.0.to_k", "mid.attn_1.k"), ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
            ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"), ("conv_shortcut", "nin_shortcut")]
    for old, new in reps:
        name = name.replace(old, new)
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level = i if rest[0] == "down_blocks" else levels - 1 - i  # ldm numbers decoder levels bottom-up
        sample = "downsample" if rest[0] == "down_blocks" else "upsample"
        tail = ".".join(rest[2:]).replace("resnets.", "block.").replace(f"{sample}rs.0.", f"{sample}.")
        tail = tail.replace("conv_shortcut", "nin_shortcut")
        name = f"{'down' if rest[0] == 'down_blocks' else 'up'}.{level}.{tail}"
    return f"{side}.{name}"


def diffusers_vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """BFL ae.safetensors layout: ldm names, attention projections as 1x1 convs."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, t in vae.state_dict().items():
        name = _vae_name(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[name] = t
    return out


def clip_l_state_dict(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """ComfyUI clip_l layout: transformers 4 names (`text_model.*`) plus a text projection."""
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    hidden = model.config.hidden_size
    sd["text_projection.weight"] = torch.eye(hidden)
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}, str(path))
    return path


def save_bfl_transformer(model: FluxTransformer2DModel, path: Path, dtype: torch.dtype | None = None,
                         prefix: str = "") -> Path:
    sd = diffusers_to_bfl(model.state_dict())
    return _save({prefix + k: v for k, v in sd.items()}, path, dtype)


def save_clip_l(model: CLIPTextModel, path: Path, dtype: torch.dtype | None = None) -> Path:
    return _save(clip_l_state_dict(model), path, dtype)


def save_t5xxl(model: T5EncoderModel, path: Path, dtype: torch.dtype | None = None) -> Path:
    """ComfyUI t5xxl layout: `shared.weight` and `encoder.*`, the tied embed_tokens copy left out."""
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return _save(sd, path, dtype)


def save_ae(vae: AutoencoderKL, path: Path, dtype: torch.dtype | None = None) -> Path:
    return _save(diffusers_vae_to_ldm(vae), path, dtype)


def save_flux_files(parts: TinyFlux, folder: Path, dtype: torch.dtype | None = None) -> dict[str, Path]:
    """The four files a FLUX single-file user has."""
    name = f"flux1-{parts.variant}.safetensors"
    return {"transformer": save_bfl_transformer(parts.transformer, folder / name, dtype),
            "clip_l": save_clip_l(parts.clip_l, folder / "clip_l.safetensors", dtype),
            "t5xxl": save_t5xxl(parts.t5xxl, folder / "t5xxl_fp16.safetensors", dtype),
            "ae": save_ae(parts.vae, folder / "ae.safetensors", dtype)}


def save_flux_folder(parts: TinyFlux, folder: Path) -> Path:
    """A diffusers FLUX folder (as FluxPipeline.save_pretrained lays it out)."""
    parts.transformer.save_pretrained(str(folder / "transformer"))
    parts.clip_l.save_pretrained(str(folder / "text_encoder"))
    parts.t5xxl.save_pretrained(str(folder / "text_encoder_2"))
    parts.vae.save_pretrained(str(folder / "vae"))
    clip_tokenizer().save_pretrained(str(folder / "tokenizer"))
    tiny_t5_tokenizer().save_pretrained(str(folder / "tokenizer_2"))
    flux_scheduler(parts.variant).save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def flux_inputs(variant: str, seed: int = 1, side: int = 4, tokens: int = 8) -> dict[str, torch.Tensor]:
    """Transformer inputs for a side x side grid of packed latents (64 = 16 channels x 2 x 2)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), rows.flatten().float(), cols.flatten().float()], dim=1)
    inputs = {
        "hidden_states": torch.randn(1, side * side, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, tokens, T5_DIM, generator=g),
        "pooled_projections": torch.randn(1, tiny_text_config().hidden_size, generator=g),
        "timestep": torch.tensor([0.5]), "img_ids": img_ids, "txt_ids": torch.zeros(tokens, 3),
    }
    if variant == "dev":
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@torch.no_grad()
def flux_forward(model: FluxTransformer2DModel, variant: str, seed: int = 1) -> torch.Tensor:
    return model(**flux_inputs(variant, seed), return_dict=False)[0]


def tiny_flux_bundle(variant: str = "dev", seed: int = 0):
    """The tiny parts as a ModelBundle of the FLUX family (what a loader or host hands the engine)."""
    from trainer.families.bundle import ModelBundle

    parts = tiny_flux(variant, seed=seed)
    return ModelBundle(family="flux", unet=parts.transformer, vae=parts.vae, text_encoders=[parts.clip_l, parts.t5xxl],
                       tokenizers=[clip_tokenizer("<|endoftext|>"), tiny_t5_tokenizer()],
                       noise_scheduler=flux_scheduler(variant), name=f"tiny-flux-{variant}")


def flux_lycoris(model: torch.nn.Module, *, algo: str = "lora", rank: int = 4, alpha: float = 2.0,
                 dora: bool = False, bypass: bool = False,
                 blocks: tuple[str, ...] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")):
    """A LyCORIS network on the transformer's block classes (FLUX's two unless told), applied to
    `model`, its weights made random (so a test sees a LoRA that changes the output); LyCORIS's
    class presets are restored."""
    from lycoris.kohya import LycorisNetworkKohya

    names = ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE")
    saved = {n: getattr(LycorisNetworkKohya, n) for n in names}
    try:
        LycorisNetworkKohya.apply_preset({"unet_target_module": list(blocks), "unet_target_name": [],
                                          "text_encoder_target_module": []})
        net = LycorisNetworkKohya(None, model, multiplier=1.0, lora_dim=rank, alpha=alpha, network_module=algo,
                                  weight_decompose=dora, bypass_mode=bypass)
    finally:
        for n, v in saved.items():
            setattr(LycorisNetworkKohya, n, v)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net
