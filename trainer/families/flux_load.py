"""FLUX.1 files to diffusers/transformers modules, offline.

Reads what users have: a BFL single file (`flux1-dev.safetensors` or `.sft`; bf16, fp16 or
float8_e4m3fn), ComfyUI-style `clip_l` and `t5xxl` files, BFL's `ae.safetensors`, or a diffusers
FLUX folder. Configs are read off tensor shapes or local files; nothing is fetched.
"""
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
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

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
CLIP_MARK = "embeddings.token_embedding.weight"
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_FILES = ("tokenizer.json", "spiece.model")
# Where a Forge install keeps T5's tokenizer (tokenizer.json; SD3's folder also has spiece.model).
FORGE_T5_TOKENIZERS = tuple("backend/huggingface/" + p for p in (
    "black-forest-labs/FLUX.1-dev/tokenizer_2", "black-forest-labs/FLUX.1-schnell/tokenizer_2",
    "stabilityai/stable-diffusion-3-medium-diffusers/tokenizer_3"))


class FluxLoadError(ValueError):
    """A FLUX file or folder could not be used; the message names it and what is wrong."""


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


def flux_scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of FLUX.1 dev or schnell, from their published configs."""
    if variant not in SCHEDULER:
        raise FluxLoadError(f"variant: {variant!r} is not one of {sorted(SCHEDULER)}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096,
                                           base_shift=0.5, max_shift=1.15, **SCHEDULER[variant])


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
