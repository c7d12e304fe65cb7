"""An SD3 / SD3.5 bundle from the files users have: a SAI single file (with or without its text
encoders and autoencoder) plus separate clip_l / clip_g / t5xxl / ae files, or a diffusers folder
(StableDiffusion3Pipeline layout). T5-XXL is optional: without it its tokens are zeros, as
diffusers' pipeline and sd-scripts encode them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from ..config.params import ConfigError
from .bundle import ModelBundle
from .flux_load import FluxLoadError
from .flux_parts import _dtype_kwarg, _from_folder, find_t5_tokenizer, load_t5_tokenizer
from .sd3_load import T5_MAX_LENGTH, SD3LoadError, diffusers_variant, load_sd3_files, sd3_scheduler
from .single_file import finish
from .tokenizer import clip_tokenizer

COMPONENTS = ("clip_l", "clip_g", "t5xxl", "ae")
CLIP_G_PAD = "!"  # CLIP-G pads with id 0, as diffusers' tokenizer_2 and sd-scripts do


class NoT5(torch.nn.Module):
    """Stands in for an absent T5-XXL: no weights; the family encodes its tokens as zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # carries the device

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """Nothing to checkpoint."""

    def gradient_checkpointing_disable(self) -> None:
        """Nothing to checkpoint."""


def _t5_tokenizer(places: Iterable[Path]) -> object:
    where = find_t5_tokenizer(places)
    return load_t5_tokenizer(where, max_length=T5_MAX_LENGTH)


def _bundle(transformer, clip_l, clip_g, t5, t5_tok, vae, scheduler, *, name: str, source: str,
            variant: str, dtype: torch.dtype, device: torch.device, extra: dict | None = None) -> ModelBundle:
    for module in (transformer, clip_l, clip_g, vae, *([t5] if t5 is not None else [])):
        finish(module, dtype, device)
    return ModelBundle(family="sd3", unet=transformer, vae=vae,
                       text_encoders=[clip_l, clip_g, t5 if t5 is not None else NoT5()],
                       tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer(CLIP_G_PAD), t5_tok],
                       noise_scheduler=scheduler, name=name, source=source,
                       extra={"sd3_variant": variant, **(extra or {})})


def load_sd3_bundle(model: str | Path, components: Mapping[str, str | Path | None] | None = None, *,
                    dtype: torch.dtype, device: torch.device, tokenizer_extra: Iterable[Path] = ()) -> ModelBundle:
    """An SD3 bundle from a SAI single file and its component files; errors name the field."""
    from ..paths import t5_tokenizer_candidates

    model, components = Path(model), dict(components or {})
    try:
        parts = load_sd3_files(model, components, dtype=dtype)
    except FluxLoadError as exc:
        role, _, detail = str(exc).partition(":")
        key = role if role in COMPONENTS else "model"
        raise ConfigError(key, str(components.get(role) or model), detail.strip()) from None
    t5_tok = None
    if parts.t5xxl is not None:
        t5_file = Path(components.get("t5xxl") or model)
        near = [p for d in dict.fromkeys((t5_file.parent, model.parent)) for p in (d / "tokenizer.json", d / "t5_tokenizer")]
        try:
            t5_tok = _t5_tokenizer([*near, *tokenizer_extra, *t5_tokenizer_candidates()])
        except FluxLoadError as exc:
            raise ConfigError("t5xxl", str(t5_file), f"{exc}; place T5's tokenizer.json next to the T5 file") from None
    used = {role: str(components.get(role) or model) for role in COMPONENTS}
    return _bundle(parts.transformer, parts.clip_l, parts.clip_g, parts.t5xxl, t5_tok, parts.vae, sd3_scheduler(),
                   name=model.stem, source=str(model), variant=parts.variant, dtype=dtype, device=device,
                   extra={"components": used})


def load_sd3_diffusers(folder: str | Path, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
    """An SD3 bundle from a diffusers folder (text_encoder_3 may be missing)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    folder = Path(folder)
    try:
        if not (folder / "model_index.json").is_file():
            raise SD3LoadError(f"model: {folder} is not a diffusers folder (no model_index.json)")
        roles = (("transformer", SD3Transformer2DModel), ("text_encoder", CLIPTextModelWithProjection),
                 ("text_encoder_2", CLIPTextModelWithProjection), ("vae", AutoencoderKL))
        parts = {role: _from_folder(cls, folder, role, **_dtype_kwarg(cls, dtype)) for role, cls in roles}
        t5 = t5_tok = None
        if (folder / "text_encoder_3").is_dir():
            t5 = _from_folder(T5EncoderModel, folder, "text_encoder_3", **_dtype_kwarg(T5EncoderModel, dtype))
            t5_tok = _t5_tokenizer([folder / "tokenizer_3"])
        scheduler = _from_folder(FlowMatchEulerDiscreteScheduler, folder, "scheduler")
        _from_folder(CLIPTokenizer, folder, "tokenizer")  # the folder must be complete
    except FluxLoadError as exc:
        raise ConfigError("model", str(folder), str(exc)) from None
    return _bundle(parts["transformer"], parts["text_encoder"], parts["text_encoder_2"], t5, t5_tok, parts["vae"],
                   scheduler, name=folder.name, source=str(folder),
                   variant=diffusers_variant(parts["transformer"].config), dtype=dtype, device=device)
