"""FLUX.1's other parts, offline: ComfyUI-style `clip_l` and `t5xxl` files, BFL's `ae.safetensors`,
T5's tokenizer, and diffusers FLUX folders. Configs are read off tensor shapes or local files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from .flux_load import AE_SCALING, AE_SHIFT, T5_MAX_LENGTH, FluxLoadError, _assign, _count, _read, _sample, read_keys

CLIP_MARK = "embeddings.token_embedding.weight"
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_FILES = ("tokenizer.json", "spiece.model")
# Where a Forge install keeps T5's tokenizer (tokenizer.json; SD3's folder also has spiece.model).
FORGE_T5_TOKENIZERS = tuple("backend/huggingface/" + p for p in (
    "black-forest-labs/FLUX.1-dev/tokenizer_2", "black-forest-labs/FLUX.1-schnell/tokenizer_2",
    "stabilityai/stable-diffusion-3-medium-diffusers/tokenizer_3"))


@dataclass
class FluxComponents:
    """The separate text-encoder and autoencoder files of a FLUX single-file model."""
    clip_l: CLIPTextModel
    t5xxl: T5EncoderModel
    vae: AutoencoderKL


@dataclass
class FluxFolder(FluxComponents):
    """Everything a diffusers FLUX folder holds."""
    transformer: FluxTransformer2DModel
    clip_tokenizer: Any
    t5_tokenizer: Any
    scheduler: FlowMatchEulerDiscreteScheduler
    variant: str


def _prefix(keys: list[str], mark: str) -> str | None:
    """The prefix that the shortest key ending in `mark` shows (ComfyUI checkpoints nest parts)."""
    key = next((k for k in sorted(keys, key=len) if k.endswith(mark)), None)
    return None if key is None else key[: -len(mark)]


def clip_l_config(sd: dict[str, torch.Tensor]) -> CLIPTextConfig:
    """OpenAI CLIP text config read off `embeddings.*`/`encoder.*` shapes (heads = hidden // 64)."""
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, "encoder.layers."), num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0], hidden_act="quick_gelu",
        projection_dim=hidden, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _clip_l(path: Path, keys: list[str], dtype: torch.dtype) -> CLIPTextModel:
    """OpenAI CLIP-L in transformers layout, under any prefix (ComfyUI writes `text_model.*`)."""
    prefix = _prefix(keys, CLIP_MARK)
    if prefix is None or not any(".self_attn.q_proj." in k for k in keys):
        raise FluxLoadError(f"clip_l: {path} holds no CLIP text encoder weights in transformers layout "
                            f"(found keys like {_sample(keys)})")
    found = _read(path, keys, prefix, role="clip_l", dtype=dtype)
    part = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in found.items()}
    with init_empty_weights():  # buffers (position_ids) stay real
        model = CLIPTextModel(clip_l_config(part))
    nested = any(k.startswith("text_model.") for k in model.state_dict())  # transformers 5 drops the level
    part = {("text_model." if nested else "") + k: v for k, v in part.items()
            if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) and not k.endswith("position_ids")}
    return _assign(model, part, role="clip_l", path=path)


def t5_config(sd: dict[str, torch.Tensor]) -> T5Config:
    """T5 v1.1 encoder config (FLUX's text_encoder_2) read off the shapes."""
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    vocab, d_model = sd["shared.weight"].shape
    layers = _count(sd, "encoder.block.")
    cfg = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=sd[T5_MARK].shape[0] // bias.shape[1], d_ff=wi.shape[0],
        num_layers=layers, num_decoder_layers=layers, num_heads=bias.shape[1],
        relative_attention_num_buckets=bias.shape[0], feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    if gated:
        cfg.dense_act_fn = "gelu_pytorch_tanh"  # as FLUX's config.json says; same formula as gelu_new
    return cfg


def _t5xxl(path: Path, keys: list[str], dtype: torch.dtype) -> T5EncoderModel:
    """T5 encoder in transformers layout (ComfyUI's t5xxl files), under any prefix."""
    prefix = _prefix(keys, T5_MARK)
    if prefix is None:
        raise FluxLoadError(f"t5xxl: {path} holds no T5 encoder weights (found keys like {_sample(keys)})")
    found = _read(path, keys, prefix, role="t5xxl", dtype=dtype)
    part = {k: v for k, v in found.items() if k.startswith(("shared.", "encoder."))}
    embed = part.get("shared.weight", part.get("encoder.embed_tokens.weight"))
    if embed is None:
        raise FluxLoadError(f"t5xxl: {path} has no token embedding (shared.weight)")
    part["shared.weight"] = part["encoder.embed_tokens.weight"] = embed  # one tensor, tied as T5 ties them
    with init_empty_weights():
        model = T5EncoderModel(t5_config(part))
    # Some transformers versions leave the tied embed_tokens out of the state dict; a block that does
    # not fit the config still goes in, so that _assign names it.
    expected = set(model.state_dict())
    return _assign(model, {k: v for k, v in part.items() if k in expected or k.startswith("encoder.block.")},
                   role="t5xxl", path=path)


def ae_config(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """AutoencoderKL config of an ldm-layout autoencoder (BFL's ae.safetensors)."""
    levels = _count(sd, "encoder.down.")
    latent = sd["decoder.conv_in.weight"].shape[1]
    if latent != 16:
        raise FluxLoadError(f"ae: {path} is a {latent}-channel VAE (an SD one?); FLUX.1 needs its "
                            "16-channel autoencoder (ae.safetensors)")
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "latent_channels": latent, "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels, "layers_per_block": _count(sd, "encoder.down.0.block."),
        "block_out_channels": tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)),
        "act_fn": "silu", "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": AE_SCALING,
        "shift_factor": AE_SHIFT, "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd, "force_upcast": True,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def _ae(path: Path, keys: list[str], dtype: torch.dtype) -> AutoencoderKL:
    prefix = _prefix(keys, "encoder.conv_in.weight")
    if prefix is None or prefix + "decoder.conv_in.weight" not in keys:
        raise FluxLoadError(f"ae: {path} holds no autoencoder weights (found keys like {_sample(keys)})")
    part = _read(path, keys, prefix, role="ae", dtype=dtype)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in part:
        raise FluxLoadError(f"ae: {path} is in diffusers layout; pass BFL's ae.safetensors or a diffusers folder")
    config = ae_config(part, path)
    converted = sfu.convert_ldm_vae_checkpoint(part, config)
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    return _assign(model, converted, role="ae", path=path)


def load_flux_components(clip_l: str | Path, t5xxl: str | Path, ae: str | Path, *,
                         dtype: torch.dtype = torch.bfloat16) -> FluxComponents:
    """Frozen CLIP-L, T5-XXL encoder and autoencoder from their separate files (fp8 is upcast)."""
    parts = []
    for role, path, build in (("clip_l", clip_l, _clip_l), ("t5xxl", t5xxl, _t5xxl), ("ae", ae, _ae)):
        path = Path(path)
        try:
            parts.append(build(path, read_keys(path, role=role), dtype))
        except KeyError as exc:  # a shape the config is read from is missing
            raise FluxLoadError(f"{role}: {path} is incomplete (no {exc.args[0]})") from exc
    return FluxComponents(*parts)


def find_t5_tokenizer(candidates: Iterable[str | Path]) -> Path:
    """The first candidate that holds a T5 tokenizer: a tokenizer.json file, or a folder with one or spiece.model."""
    searched = []
    for candidate in candidates:
        path = Path(candidate)
        searched.append(str(path))
        if path.is_file() and path.suffix == ".json":
            return path
        if path.is_dir() and any((path / name).is_file() for name in T5_FILES):
            return path
    listing = "\n  ".join(searched) or "(no places given)"
    raise FluxLoadError("t5 tokenizer: no T5 tokenizer (tokenizer.json or spiece.model) found in:\n  " + listing)


def forge_t5_tokenizers(forge_root: str | Path) -> list[Path]:
    """The places a Forge install at `forge_root` keeps T5's tokenizer, for find_t5_tokenizer."""
    return [Path(forge_root) / p for p in FORGE_T5_TOKENIZERS]


def _tokenizer_from_json(file: Path) -> Any:
    """A `tokenizers` Tokenizer; for tokenizers < 0.19 (A1111's 0.13) newer files get back the
    Metaspace `add_prefix_space` flag that their `prepend_scheme` replaced."""
    import tokenizers

    text = file.read_text(encoding="utf-8")
    if tuple(int(x) for x in tokenizers.__version__.split(".")[:2]) < (0, 19):
        data = json.loads(text)
        for part in (data.get("pre_tokenizer"), data.get("decoder")):
            for step in [part or {}, *(part or {}).get("pretokenizers", [])]:
                if step.get("type") == "Metaspace" and "add_prefix_space" not in step:
                    step["add_prefix_space"] = step.get("prepend_scheme", "always") != "never"
        text = json.dumps(data)
    return tokenizers.Tokenizer.from_str(text)


def load_t5_tokenizer(path: str | Path, *, max_length: int = 512) -> Any:
    """A fast T5 tokenizer from a tokenizer.json (or a folder with one, or with spiece.model)."""
    from transformers import PreTrainedTokenizerFast, T5TokenizerFast

    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_length}
    try:
        if file.is_file():
            return PreTrainedTokenizerFast(tokenizer_object=_tokenizer_from_json(file), **specials)
        return T5TokenizerFast.from_pretrained(str(path), local_files_only=True, **specials)
    except Exception as exc:  # the tokenizers library raises bare Exceptions for files it cannot parse
        raise FluxLoadError(f"t5 tokenizer: {path} could not be read ({exc})") from exc


def _from_folder(cls: Any, folder: Path, role: str, **kwargs: Any) -> Any:
    sub = folder / role
    if not sub.is_dir():
        raise FluxLoadError(f"{role}: {folder} has no {role}/ folder; a diffusers FLUX folder has transformer/, "
                            "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/ and scheduler/")
    try:
        return cls.from_pretrained(str(sub), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FluxLoadError(f"{role}: {sub} could not be loaded ({exc})") from exc


def _dtype_kwarg(cls: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 renamed from_pretrained's torch_dtype to dtype (the old name logs a deprecation)."""
    new_name = cls.__module__.startswith("transformers") and int(transformers.__version__.split(".")[0]) >= 5
    return {"dtype" if new_name else "torch_dtype": dtype}


def load_flux_folder(folder: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> FluxFolder:
    """Every part of a diffusers FLUX folder, frozen, in `dtype`."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FluxLoadError(f"model: {folder} is not a diffusers folder (no model_index.json)")
    roles = (("transformer", FluxTransformer2DModel), ("text_encoder", CLIPTextModel),
             ("text_encoder_2", T5EncoderModel), ("vae", AutoencoderKL))
    parts = {role: _from_folder(cls, folder, role, **_dtype_kwarg(cls, dtype)) for role, cls in roles}
    for module in parts.values():
        module.eval().requires_grad_(False)
    variant = "dev" if parts["transformer"].config.guidance_embeds else "schnell"
    t5_dir = find_t5_tokenizer([folder / "tokenizer_2"])
    return FluxFolder(
        clip_l=parts["text_encoder"], t5xxl=parts["text_encoder_2"], vae=parts["vae"],
        transformer=parts["transformer"], clip_tokenizer=_from_folder(CLIPTokenizer, folder, "tokenizer"),
        t5_tokenizer=load_t5_tokenizer(t5_dir, max_length=T5_MAX_LENGTH[variant]),
        scheduler=_from_folder(FlowMatchEulerDiscreteScheduler, folder, "scheduler"), variant=variant)
