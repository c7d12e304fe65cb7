"""A FLUX.1 bundle from the files users have: a BFL transformer file with separate CLIP-L, T5-XXL and
autoencoder files (or one all-in-one file holding them all), or a diffusers folder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..config.params import ConfigError
from .bundle import ModelBundle
from .flux_load import T5_MAX_LENGTH, FluxLoadError, flux_scheduler, load_flux_transformer
from .flux_parts import find_t5_tokenizer, load_flux_components, load_flux_folder, load_t5_tokenizer
from .single_file import finish
from .tokenizer import clip_tokenizer

COMPONENTS = ("clip_l", "t5xxl", "ae")


def tokenizer_places(model: Path, t5xxl: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Where T5's tokenizer is looked for, in order: next to the T5 file or the model, the caller's
    places (a WebUI's own copy), then the project's cache (filled by install.py)."""
    from ..paths import t5_tokenizer_candidates

    near = [p for d in dict.fromkeys((t5xxl.parent, model.parent)) for p in (d / "tokenizer.json", d / "t5_tokenizer")]
    return [*near, *extra, *t5_tokenizer_candidates()]


def _component_paths(model: Path, components: Mapping[str, str | Path | None]) -> dict[str, Path]:
    """Each component's file; a component left empty is read from the model file itself (all-in-one
    files hold all four parts)."""
    return {role: Path(components.get(role) or model) for role in COMPONENTS}


def load_flux_files(model: str | Path, components: Mapping[str, str | Path | None] | None = None, *,
                    dtype: torch.dtype, device: torch.device, tokenizer_extra: Iterable[Path] = ()) -> ModelBundle:
    """A FLUX bundle from a BFL transformer file and its component files."""
    model = Path(model)
    paths = _component_paths(model, components or {})
    try:
        transformer = load_flux_transformer(model, dtype=dtype)
        parts = load_flux_components(paths["clip_l"], paths["t5xxl"], paths["ae"], dtype=dtype)
    except FluxLoadError as exc:
        raise _as_config_error(exc, model, components or {}) from None
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    try:
        where = find_t5_tokenizer(tokenizer_places(model, paths["t5xxl"], tokenizer_extra))
        t5_tok = load_t5_tokenizer(where, max_length=T5_MAX_LENGTH[variant])
    except FluxLoadError as exc:
        raise ConfigError("t5xxl", str(paths["t5xxl"]), f"{exc}; place T5's tokenizer.json next to the T5 file, "
                                                        "or run install.py to fetch it into the cache") from None
    for module in (transformer, parts.clip_l, parts.t5xxl, parts.vae):
        finish(module, dtype, device)
    return ModelBundle(family="flux", unet=transformer, vae=parts.vae, text_encoders=[parts.clip_l, parts.t5xxl],
                       tokenizers=[clip_tokenizer("<|endoftext|>"), t5_tok], noise_scheduler=flux_scheduler(variant),
                       name=model.stem, source=str(model),
                       extra={"components": {role: str(p) for role, p in paths.items()}})


def _as_config_error(exc: FluxLoadError, model: Path, components: Mapping) -> ConfigError:
    """The loader's message under the field the user sets: a role that was left empty points at
    the model file, which then holds only the transformer."""
    role = str(exc).split(":", 1)[0]
    if role in COMPONENTS:
        given = components.get(role)
        hint = "" if given else f"; {model.name} holds no {role} part, so choose the {role} file"
        return ConfigError(role, str(given or ""), f"{str(exc).split(':', 1)[1].strip()}{hint}")
    return ConfigError("model", str(model), str(exc).split(":", 1)[-1].strip())


def load_flux_diffusers(folder: str | Path, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
    """A FLUX bundle from a diffusers folder (FluxPipeline layout)."""
    folder = Path(folder)
    try:
        parts = load_flux_folder(folder, dtype=dtype)
    except FluxLoadError as exc:
        raise ConfigError("model", str(folder), str(exc)) from None
    for module in (parts.transformer, parts.clip_l, parts.t5xxl, parts.vae):
        finish(module, dtype, device)
    return ModelBundle(family="flux", unet=parts.transformer, vae=parts.vae,
                       text_encoders=[parts.clip_l, parts.t5xxl], tokenizers=[parts.clip_tokenizer, parts.t5_tokenizer],
                       noise_scheduler=parts.scheduler, name=folder.name, source=str(folder))
