"""A Z-Image bundle from the files users have, offline: a diffusers ZImagePipeline folder, or a
transformer file with a Qwen3 text-encoder file and an autoencoder file (ComfyUI's split files).

Nothing is fetched: configs are read off tensor shapes, Qwen3's tokenizer is read from disk
(next to the Qwen3 file or the model, or a folder's tokenizer/). ZImageTransformer2DModel first
appears in diffusers 0.36; elsewhere a Z-Image model is refused with a message saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config.params import ConfigError
from .bundle import ModelBundle
from .zimage_keys import ZImageKeyError, layout, original_to_diffusers, transformer_config

MIN_DIFFUSERS = "0.36"
# Z-Image (Turbo and base) scheduler/scheduler_config.json
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
TOKENIZER_DIRS = ("qwen3_tokenizer", "tokenizer", "")
QWEN3_MARK = "layers.0.self_attn.q_proj.weight"


def diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "(not installed)"


def has_zimage() -> bool:
    """Whether the installed diffusers has Z-Image's transformer and pipeline. Their files are looked
    for, nothing is imported: importing diffusers' model packages costs seconds at start-up."""
    from importlib.util import find_spec

    spec = find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(root) / "models" / "transformers" / "transformer_z_image.py").is_file()
               and (Path(root) / "pipelines" / "z_image" / "__init__.py").is_file()
               for root in spec.submodule_search_locations)


def require_zimage(path: str | Path) -> None:
    """Refuse a Z-Image model where diffusers cannot build one, naming the versions."""
    if not has_zimage():
        raise ConfigError("model", str(path), f"is a Z-Image model, which needs diffusers >= {MIN_DIFFUSERS} "
                                              f"(ZImageTransformer2DModel); this environment has diffusers "
                                              f"{diffusers_version()}, pinned by its host")


def is_zimage_model(path: str | Path) -> bool:
    """A diffusers ZImagePipeline folder, or a safetensors file holding a Z-Image transformer (header only)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            return str(index.get("_class_name", "")).startswith("ZImage")
        if path.suffix.lower() not in (".safetensors", ".sft"):
            return False
        with safe_open(str(path), framework="pt") as fh:
            return layout(fh.keys()) is not None
    except (OSError, ValueError, SafetensorError):
        return False


def _read(path: Path, field: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConfigError(field, str(path), "file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            # cast one tensor at a time: the peak is the result, not the file plus the result
            return {k: _cast(fh.get_tensor(k), dtype) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(field, str(path), f"is not a readable safetensors file ({exc})") from None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor], field: str, path: Path) -> torch.nn.Module:
    """Put `sd` into a module built on the meta device; every parameter must be covered."""
    try:
        _, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:
        raise ConfigError(field, str(path), f"does not fit the layout read off its shapes ({exc})") from None
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise ConfigError(field, str(path), f"does not fit the layout read off its shapes "
                                            f"(missing: {missing[:3]}, unexpected: {list(unexpected)[:3]})")
    return module.eval().requires_grad_(False)


def load_transformer(path: Path, dtype: torch.dtype) -> Any:
    """ZImageTransformer2DModel from a single file in the diffusers or the original layout."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    sd = _read(path, "model", dtype)
    found = layout(sd)
    if found is None:
        raise ConfigError("model", str(path), "holds no Z-Image transformer")
    kind, prefix = found
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if kind == "original":
        sd = original_to_diffusers(sd)
    try:
        config = transformer_config(sd)
    except ZImageKeyError as exc:
        raise ConfigError("model", str(path), str(exc)) from None
    with init_empty_weights():
        model = ZImageTransformer2DModel.from_config(config)
    return _assign(model, sd, "model", path)


def qwen3_config(sd: dict[str, torch.Tensor]) -> Any:
    """Qwen3 config read off the shapes (Qwen3-4B's rope theta, norm eps and context)."""
    from transformers import Qwen3Config

    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[1] for k in sd if k.startswith("layers.")}), head_dim=head_dim,
        num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True)


def load_qwen3(path: Path, dtype: torch.dtype) -> Any:
    """Qwen3Model from a text-encoder file (``model.*`` as ComfyUI and Qwen3ForCausalLM keep it, or bare)."""
    from accelerate import init_empty_weights
    from transformers import Qwen3Model

    sd = _read(path, "qwen3", dtype)
    key = next((k for k in sorted(sd, key=len) if k.endswith(QWEN3_MARK)), None)
    if key is None:
        raise ConfigError("qwen3", str(path), f"holds no Qwen3 text encoder (keys like {sorted(sd)[:3]})")
    prefix = key[: -len(QWEN3_MARK)]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    with init_empty_weights():
        model = Qwen3Model(qwen3_config(sd))
    buffers = {n for n, _ in model.named_buffers()}
    sd = {k: v for k, v in sd.items() if k not in buffers}
    return _assign(model, sd, "qwen3", path)


def tokenizer_places(*files: Path) -> list[Path]:
    """Where Qwen3's tokenizer is looked for: folders next to the Qwen3 file, then next to the model."""
    dirs = dict.fromkeys(f.parent for f in files)
    return [d / sub if sub else d for d in dirs for sub in TOKENIZER_DIRS]


def load_tokenizer(places: Iterable[Path], *, field: str, value: str) -> Any:
    """Qwen3's tokenizer from the first folder with a tokenizer.json; the error lists every place."""
    from transformers import AutoTokenizer

    searched = []
    for folder in places:
        searched.append(str(folder))
        if (folder / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(field, value, f"Qwen3's tokenizer in {folder} could not be read ({exc})") from None
    listing = "\n  ".join(searched)
    raise ConfigError(field, value, "no Qwen3 tokenizer (tokenizer.json with its tokenizer_config.json) found in:\n  "
                      + listing)


def scheduler(config: dict | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**(config or SCHEDULER))


def load_zimage_files(model: str | Path, qwen3: str | Path | None, vae: str | Path | None, *,
                      dtype: torch.dtype, device: torch.device) -> ModelBundle:
    """A Z-Image bundle from a transformer file, a Qwen3 file and an autoencoder (FLUX's ae) file."""
    from .flux_load import FluxLoadError, read_keys
    from .flux_parts import _ae
    from .single_file import finish

    model = Path(model)
    require_zimage(model)
    if not qwen3:
        raise ConfigError("qwen3", "", f"{model.name} holds only the transformer: choose the Qwen3 text-encoder "
                                       "file (qwen_3_4b.safetensors)")
    if not vae:
        raise ConfigError("vae", "", f"{model.name} holds only the transformer: choose the autoencoder file "
                                     "(ae.safetensors)")
    qwen3, vae = Path(qwen3), Path(vae)
    transformer = load_transformer(model, dtype)
    encoder = load_qwen3(qwen3, dtype)
    try:  # FLUX.1's ae.safetensors, read by the FLUX loader
        autoencoder = _ae(vae, read_keys(vae, role="ae"), dtype)
    except FluxLoadError as exc:
        raise ConfigError("vae", str(vae), str(exc).split(":", 1)[-1].strip()) from None
    tokenizer = load_tokenizer(tokenizer_places(qwen3, model), field="qwen3", value=str(qwen3))
    for module in (transformer, encoder, autoencoder):
        finish(module, dtype, device)
    return ModelBundle(family="zimage", unet=transformer, vae=autoencoder, text_encoders=[encoder],
                       tokenizers=[tokenizer], noise_scheduler=scheduler(), name=model.stem, source=str(model),
                       extra={"components": {"qwen3": str(qwen3), "vae": str(vae)}})


def load_zimage_folder(folder: str | Path, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
    """A Z-Image bundle from a diffusers ZImagePipeline folder."""
    folder = Path(folder)
    require_zimage(folder)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import AutoModel

    from .flux_parts import _dtype_kwarg
    from .single_file import finish

    parts = {}
    for role, cls in (("transformer", ZImageTransformer2DModel), ("text_encoder", AutoModel),
                      ("vae", AutoencoderKL), ("scheduler", FlowMatchEulerDiscreteScheduler)):
        if not (folder / role).is_dir():
            raise ConfigError("model", str(folder), f"has no {role}/ folder; a Z-Image folder has transformer/, "
                                                    "text_encoder/, tokenizer/, vae/ and scheduler/")
        kwargs = {} if role == "scheduler" else _dtype_kwarg(cls, dtype)
        try:
            parts[role] = cls.from_pretrained(str(folder / role), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError("model", str(folder), f"{role}/ could not be loaded ({exc})") from None
    tokenizer = load_tokenizer([folder / "tokenizer"], field="model", value=str(folder))
    for role in ("transformer", "text_encoder", "vae"):
        finish(parts[role], dtype, device)
    return ModelBundle(family="zimage", unet=parts["transformer"], vae=parts["vae"],
                       text_encoders=[parts["text_encoder"]], tokenizers=[tokenizer],
                       noise_scheduler=parts["scheduler"], name=folder.name, source=str(folder))
