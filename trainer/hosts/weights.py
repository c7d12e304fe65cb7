"""The weights of the model a WebUI has loaded, as a ModelBundle, without reading any file.

A1111 keeps an ldm model whose ``state_dict()`` already has checkpoint key names, except
for the hijack's ``.wrapped`` levels and SDXL's ``cond_stage_model`` alias; the tensors
are shared, not copied. Forge keeps its parts apart (``forge_objects``) and builds them
under ``torch.inference_mode()``, so its tensors cannot enter autograd: they are cloned
(from memory, still no disk read). Nothing here imports the WebUI's ``modules``: the
adapter hands the objects in.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from ..families.bundle import ModelBundle
from ..families.ldm_clip import hf_clip_from_state_dict
from ..families.loading import load_from_state_dict
from ..config.params import ConfigError

log = logging.getLogger(__name__)


def strip_wrapped(key: str) -> str:
    """A1111's hijack nests text-encoder parts under `.wrapped`; checkpoints have no such level."""
    return ".".join(part for part in key.split(".") if part != "wrapped")


def a1111_state_dict(sd_model: Any) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors of an A1111 model (shared with it, not copied)."""
    raw = sd_model.state_dict()
    has_conditioner = any(k.startswith("conditioner.") for k in raw)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if has_conditioner and key.startswith("cond_stage_model."):
            continue  # SDXL's alias of conditioner: the same tensors a second time
        out[strip_wrapped(key)] = value
    return out


def merged_modules(sd_model: Any) -> list[Any]:
    """Modules that carry a LoRA merged in place by the built-in Lora extension."""
    return [m for m in sd_model.modules() if getattr(m, "network_current_names", ())]


def unmerge_loras(sd_model: Any, networks: Any | None) -> int:
    """Put back the pristine weights the built-in Lora extension backed up; returns how many.

    The host merges a prompt's LoRAs into the weights and leaves them there after the
    generation. Training on such weights would bake someone else's LoRA into ours.
    With the backups restored and the names reset, the host merges again on its next
    generation that asks for a LoRA.
    """
    merged = merged_modules(sd_model)
    if not merged:
        return 0
    if networks is None or not hasattr(networks, "network_restore_weights_from_backup"):
        raise ConfigError("model", getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", "loaded model"),
                          "a LoRA is merged into the loaded model's weights and cannot be taken out here; "
                          "generate once without LoRAs (or reload the checkpoint), then start again")
    with torch.no_grad():  # the host's restore is a plain copy_ into Parameters that may require grad
        for module in merged:
            networks.network_restore_weights_from_backup(module)
            module.network_current_names = ()
    if hasattr(networks, "loaded_networks"):
        networks.loaded_networks.clear()
    log.info("took %d merged LoRA weights out of the loaded model before training", len(merged))
    return len(merged)


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _renamed(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + k[len(old):]: v for k, v in sd.items() if k.startswith(old)}


def _owned(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the host's tensors in one dtype, made outside inference mode.

    Forge's tensors are inference tensors (they cannot be saved for backward) and come in
    mixed dtypes: fp16 text encoders whose token and position embeddings its engine casts
    to fp32. Copying in one dtype fixes both; values from an fp16 file are exact in fp32.
    """
    with torch.inference_mode(False):
        return {k: v.to(dtype=dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in sd.items()}


def without_aliases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `.wrapped.` aliases whose plain key is present (Forge's textual-inversion wrapper
    keeps the token embedding both as `token_embedding.weight` and `token_embedding.wrapped.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        plain = strip_wrapped(key)
        if plain != key and plain in sd:
            continue
        out[plain] = value
    return out


def forge_lora_backups(holder: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The pristine tensors Forge's LoraLoader set aside when it merged a LoRA in place.

    `holder` is the module a patcher wraps (the KModel, the joint text encoder); its
    `lora_loader.backup` maps parameter paths to the originals and stays filled until the
    next generation without LoRAs. Keys are returned without `prefix`.
    """
    backup = getattr(getattr(holder, "lora_loader", None), "backup", None) or {}
    return {k[len(prefix):]: v for k, v in backup.items() if k.startswith(prefix)}


def _pristine(module: Any, backups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = module.state_dict()
    unknown = sorted(set(backups) - set(sd))
    if unknown:
        raise ConfigError("model", "loaded model", f"Forge's LoRA backups name weights the model lacks: {unknown[:3]}")
    return {**sd, **backups}


def forge_parts(sd_model: Any, dtype: torch.dtype = torch.float32) -> tuple[dict, dict, dict, int]:
    """(U-Net, VAE, text-encoder) state dicts of a Forge model as owned copies in `dtype`,
    with any merged LoRA taken out (from Forge's own backups), and how many weights that restored."""
    objects = sd_model.forge_objects
    kmodel, clip_model = objects.unet.model, objects.clip.cond_stage_model
    unet_backups = forge_lora_backups(kmodel, "diffusion_model.")
    clip_backups = forge_lora_backups(clip_model)
    unet = _owned(_pristine(kmodel.diffusion_model, unet_backups), dtype)
    vae = _owned(objects.vae.first_stage_model.state_dict(), dtype)
    clip = _owned(without_aliases(_pristine(clip_model, clip_backups)), dtype)
    restored = len(unet_backups) + len(clip_backups)
    if restored:
        log.info("read %d weights from Forge's LoRA backups: the LoRA merged by the last generation is left out",
                 restored)
    return unet, vae, clip, restored


EXACT_STORAGE = {torch.float16, torch.bfloat16, torch.float32}


def forge_lossy_storage(sd_model: Any) -> str | None:
    """Forge's U-Net storage when it is lossy (fp8, nf4, fp4, gguf: `--unet-in-fp8-*` or the UI's
    storage setting), else None: such weights are not the checkpoint's, so a job reads the file."""
    stored = getattr(sd_model.forge_objects.unet.model.diffusion_model, "storage_dtype", None)
    return None if stored is None or stored in EXACT_STORAGE else str(stored).replace("torch.", "")


def family_of(sd_model: Any) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"


def forge_bundle(sd_model: Any, *, name: str, v_pred: bool | None, original_config: Any = None,
                 dtype: torch.dtype = torch.float32) -> ModelBundle:
    """A Forge model as a bundle: ldm names for the U-Net/VAE/CLIP-L, transformers' for CLIP-H/G."""
    family = family_of(sd_model)
    if family == "sdxl" and not hasattr(sd_model.forge_objects.clip.cond_stage_model, "clip_l"):
        raise ConfigError("model", name, "is an SDXL refiner (OpenCLIP-G only, no CLIP-L); Traindeck trains "
                                         "SDXL base models: load one in the WebUI or name one in the job")
    unet, vae, clip, restored = forge_parts(sd_model, dtype)
    sd = {**_prefixed(unet, "model.diffusion_model."), **_prefixed(vae, "first_stage_model.")}
    tes = None
    if family == "sd1":
        sd.update(_renamed(clip, "clip_l.transformer.", "cond_stage_model.transformer."))
    elif family == "sd2":
        tes = [hf_clip_from_state_dict(clip, "clip_h.transformer.", name=name, projection=False)]
    else:
        sd.update(_renamed(clip, "clip_l.transformer.", "conditioner.embedders.0.transformer."))
        from ..families.ldm_clip import SDXL_CLIP_L, clip_l_from_ldm

        tes = [clip_l_from_ldm(sd, SDXL_CLIP_L, name=name),
               hf_clip_from_state_dict(clip, "clip_g.transformer.", name=name, projection=True)]
    bundle = load_from_state_dict(sd, name=name, v_pred=v_pred, family=family, text_encoders=tes,
                                  original_config=original_config)
    bundle.extra["loras_taken_out"] = restored
    return bundle


def weights_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A hash of tensor contents (tests and the benchmark use it to prove nothing changed)."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
