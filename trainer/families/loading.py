"""Load a Stable Diffusion model (diffusers folder, ldm single file, or state dict) into a ModelBundle.

Everything is local: diffusers folders load with local_files_only, single files
use the shipped ldm configs (or the .yaml next to the file), and the CLIP
tokenizer is rebuilt offline. Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .bundle import ModelBundle
from . import detect_family, get_family
from .base import Family
from .checkpoint import ModelError, normalize_keys, read_state_dict, sibling_yaml, v_pred_hint
from .ldm_clip import text_encoders_from_ldm
from .single_file import (LATENT_SIZE, default_config, finish, looks_v_pred, read_original_config,
                          unet_from_ldm, vae_from_ldm, vae_from_vae_file)
from .tokenizer import clip_tokenizer

__all__ = ["ModelError", "detect_family", "load_model", "load_from_state_dict", "load_vae_file", "sd_scheduler"]

log = logging.getLogger(__name__)

SD_VAE_SCALE = 0.18215


def sd_scheduler(v_pred: bool) -> DDPMScheduler:
    """The Stable Diffusion training schedule (scaled_linear 0.00085-0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_pred else "epsilon", clip_sample=False,
    )


def _trainable_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inference-mode tensors (a host may hold its weights that way) cannot back module
    parameters used in training, so those, and only those, are copied."""
    if not any(v.is_inference() for v in sd.values()):
        return sd
    return {k: v.clone() if v.is_inference() else v for k, v in sd.items()}


def _decide_v_pred(forced: bool | None, hint: bool | None, family: Family, unet: UNet2DConditionModel) -> bool:
    """`model_v_pred` (True) wins; then what the file says; then A1111's SD2 output test."""
    if forced:
        return True
    if hint is not None:
        return hint
    if family.v_pred_detectable:
        return looks_v_pred(unet)
    return False


def _from_ldm(sd: dict[str, torch.Tensor], *, name: str, original_config: dict | str | Path | None,
              meta: dict[str, str], v_pred: bool | None, dtype: torch.dtype | None,
              device: torch.device | None, family: str | Family | None = None,
              text_encoders: list[torch.nn.Module] | None = None) -> ModelBundle:
    """The shared single-file / state-dict conversion path (text encoders may come ready-made)."""
    sd = normalize_keys(_trainable_tensors(sd))
    family = get_family(family) if family else detect_family(sd, name=name)
    given = read_original_config(original_config, name=name) if original_config is not None else None
    hint = v_pred_hint(sd, meta, given)
    config = given or default_config(family.name, v_pred=bool(hint or v_pred))
    unet = unet_from_ldm(sd, config, family.name, name=name)
    vp = _decide_v_pred(v_pred, hint, family, unet)
    if family.v_pred_detectable and vp:
        unet.register_to_config(sample_size=LATENT_SIZE["sd2v"])  # 768-v
    if given is None:
        config = default_config(family.name, v_pred=vp)  # same networks; records the right parameterization
    vae = vae_from_ldm(sd, config, name=name, pixel_size=unet.config.sample_size * 8)
    tes = text_encoders if text_encoders is not None else text_encoders_from_ldm(sd, family.name, name=name)
    for module in (unet, vae, *tes):
        finish(module, dtype, device)
    return ModelBundle(
        family=family, unet=unet, vae=vae, text_encoders=tes,
        tokenizers=[clip_tokenizer(pad) for pad in family.pad_tokens], noise_scheduler=sd_scheduler(vp),
        v_pred=vp, name=name, source=name,
        extra={"original_config": config},
    )


def load_from_state_dict(state_dict: dict[str, torch.Tensor], *, name: str = "memory",
                         original_config: dict | str | Path | None = None, v_pred: bool | None = None,
                         dtype: torch.dtype | None = None, family: str | Family | None = None,
                         text_encoders: list[torch.nn.Module] | None = None) -> ModelBundle:
    """A bundle from an in-memory ldm (A1111) state dict.

    Where the conversion only renames keys (U-Net, VAE, CLIP-L), the modules share
    storage with `state_dict` as long as no dtype change is asked for. `v_pred=True`
    forces v-prediction; None or False means "detect". `family` and ready-made
    `text_encoders` serve a host whose text encoders are not in the ldm layout.
    """
    return _from_ldm(dict(state_dict), name=name, original_config=original_config, meta={},
                     v_pred=v_pred, dtype=dtype, device=None, family=family, text_encoders=text_encoders)


def _pretrained(cls, folder: Path, **kw):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{folder}: could not load {cls.__name__} ({exc})") from exc


def _folder_tokenizer(folder: Path, pad: str) -> CLIPTokenizer:
    """The folder's own tokenizer when it ships one, else the offline CLIP tokenizer."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _pretrained(CLIPTokenizer, folder)
    return clip_tokenizer(pad)


def _folder_v_pred(folder: Path) -> bool:
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return False
    return json.loads(cfg_file.read_text(encoding="utf-8")).get("prediction_type") == "v_prediction"


def _load_folder(folder: Path, *, v_pred: bool | None) -> ModelBundle:
    """A diffusers pipeline folder (model_index.json with unet/, vae/, text_encoder/, ...)."""
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"{folder}: a model folder needs a model_index.json (diffusers layout)")
    unet = _pretrained(UNet2DConditionModel, folder / "unet")
    vae = _pretrained(AutoencoderKL, folder / "vae")
    # The family from the U-Net's own state dict, as for a single file
    family = detect_family(unet.state_dict(), name=str(folder / "unet"))
    tes = [_pretrained(CLIPTextModel, folder / "text_encoder")]
    if family.text_encoder_count == 2:
        tes.append(_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2"))
    subs = ("tokenizer", "tokenizer_2")[: len(tes)]
    toks = [_folder_tokenizer(folder / sub, pad) for sub, pad in zip(subs, family.pad_tokens, strict=True)]
    vp = bool(v_pred) or _folder_v_pred(folder)
    return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=tes, tokenizers=toks,
                       noise_scheduler=sd_scheduler(vp), v_pred=vp, name=folder.name, source=str(folder))


def load_vae_file(path: str | Path, *, scaling_factor: float = SD_VAE_SCALE,
                  dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> AutoencoderKL:
    """A separate VAE: an ldm/A1111 VAE file (with or without `first_stage_model.`) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        vae = _pretrained(AutoencoderKL, path)
    else:
        sd, _ = read_state_dict(path)
        vae = vae_from_vae_file(sd, name=str(path), scaling_factor=scaling_factor)
    return finish(vae, dtype, device or torch.device("cpu"))


def _flux_model(path: Path, family: str = "flux") -> bool:
    from . import file_family

    return file_family(path) == family


def load_model(path: str | Path, *, vae: str | Path | None = None, v_pred: bool | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | None = None,
               components: dict[str, str | Path | None] | None = None,
               tokenizer_extra: tuple[Path, ...] = ()) -> ModelBundle:
    """A diffusers folder, or an ldm single file (.safetensors, or a weights-only .ckpt/.pt/.pth).

    A same-name .yaml next to a single file is used as its original config.
    `vae` replaces the model's VAE. `v_pred=True` forces v-prediction; None or
    False means "detect" (yaml, a `v_pred` key, the scheduler config, or A1111's
    SD2 test). `components` names a FLUX model's separate clip_l, t5xxl and ae files (`vae`
    stands for the autoencoder when ae is not given); `tokenizer_extra` adds places to look for
    T5's tokenizer.
    """
    path = Path(path)
    device = device or torch.device("cpu")
    from .zimage_load import is_zimage_model, load_zimage_files, load_zimage_folder

    if is_zimage_model(path):  # refused with the versions where diffusers has no Z-Image
        if path.is_dir():
            return load_zimage_folder(path, dtype=dtype, device=device)
        return load_zimage_files(path, (components or {}).get("qwen3"), vae, dtype=dtype, device=device)
    if _flux_model(path):
        from .flux_files import load_flux_diffusers, load_flux_files

        if path.is_dir():
            return load_flux_diffusers(path, dtype=dtype, device=device)
        parts = {"ae": vae, **{k: v for k, v in (components or {}).items() if v}}
        return load_flux_files(path, parts, dtype=dtype, device=device, tokenizer_extra=tokenizer_extra)
    if _flux_model(path, "sd3"):
        from .sd3_files import load_sd3_bundle, load_sd3_diffusers

        if path.is_dir():
            return load_sd3_diffusers(path, dtype=dtype, device=device)
        parts = {"ae": vae, **{k: v for k, v in (components or {}).items() if v}}
        return load_sd3_bundle(path, parts, dtype=dtype, device=device, tokenizer_extra=tokenizer_extra)
    if path.is_dir():
        bundle = _load_folder(path, v_pred=v_pred)
        for module in bundle.modules():
            finish(module, dtype, device)
    else:
        sd, meta = read_state_dict(path)
        bundle = _from_ldm(sd, name=str(path), original_config=sibling_yaml(path), meta=meta,
                           v_pred=v_pred, dtype=dtype, device=device)
        bundle.name = path.stem
    if vae:
        bundle.vae = load_vae_file(vae, scaling_factor=bundle.vae_scale, dtype=dtype, device=device)
        bundle.extra["vae"] = str(vae)
    log.info("loaded %s (%s%s) from %s", bundle.name, bundle.family, ", v-pred" if bundle.v_pred else "", path)
    return bundle
