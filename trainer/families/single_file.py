"""ldm (A1111) single-file U-Net and VAE to diffusers modules, through diffusers' converters.

Modules are built with empty (meta) weights and the converted tensors are
assigned, not copied: where the converter only renames keys, the module shares
storage with the state dict it came from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu

from .checkpoint import ModelError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_YAML = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml", "sdxl": "sd_xl_base.yaml"}
V_YAML = "v2-inference-v.yaml"
LATENT_SIZE = {"sd1": 64, "sd2": 64, "sd2v": 96, "sdxl": 128}  # native resolution / 8
M = TypeVar("M", bound=torch.nn.Module)


def read_original_config(config: dict | str | Path, *, name: str = "config") -> dict:
    """An ldm yaml config as a dict, from a dict or a local file (never a URL)."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise ModelError(f"{name}: original config {path} does not exist")
    try:
        loaded = sfu.fetch_original_config(str(path), local_files_only=True)
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not a valid yaml file ({exc})") from exc
    if not isinstance(loaded, dict) or "params" not in (loaded.get("model") or {}):
        raise ModelError(f"{path}: not an ldm model config (no model.params)")
    return loaded


def default_config(family: str, v_pred: bool = False) -> dict:
    """The shipped ldm config of the real base model of `family`."""
    name = V_YAML if family == "sd2" and v_pred else DEFAULT_YAML[family]
    return read_original_config(CONFIG_DIR / name)


def build_empty(factory: Callable[[], M]) -> M:
    """A module whose parameters live on the meta device until weights are assigned."""
    with init_empty_weights():  # buffers stay real, so e.g. CLIP position_ids are valid
        return factory()


def assign_load(module: M, state_dict: dict[str, torch.Tensor], *, what: str, name: str) -> M:
    """Put `state_dict` into an empty `module` by assignment; every parameter must be covered."""
    try:
        _, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        if "size mismatch" not in str(exc):
            raise ModelError(f"{name}: could not load the {what} weights ({detail})") from exc
        raise ModelError(
            f"{name}: the {what} weights do not fit its config; if the model is not a standard "
            f"architecture, put its original .yaml next to the file. ({detail})"
        ) from exc
    left = [n for n, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
    if left or unexpected:
        raise ModelError(
            f"{name}: the {what} weights do not fit its config (missing: {left[:3]}, unexpected: "
            f"{list(unexpected)[:3]}); if the model is not a standard architecture, put its original .yaml "
            "next to the file."
        )
    return module


def finish(module: M, dtype: torch.dtype | None, device: torch.device | None) -> M:
    """Cast/move only where needed (so shared storage stays shared), freeze, eval."""
    tensors = [*module.parameters(), *module.buffers()]
    if any((dtype is not None and t.is_floating_point() and t.dtype != dtype)
           or (device is not None and t.device != torch.device(device)) for t in tensors):
        # Plain nn.Module.to: diffusers' override only adds a warning about fp32-kept
        # modules, which SD U-Nets and VAEs do not have.
        torch.nn.Module.to(module, device=device, dtype=dtype)
    module.eval().requires_grad_(False)
    return module


def _unet_params(original_config: dict) -> dict:
    params = original_config["model"]["params"]
    return (params.get("unet_config") or params.get("network_config") or {}).get("params", {})


def _time_embed_dim(original_config: dict) -> int:
    """outdim of SDXL's size/crop embedders (ConcatTimestepEmbedderND), 256 in the real model."""
    conditioner = original_config["model"]["params"].get("conditioner_config") or {}
    for emb in conditioner.get("params", {}).get("emb_models", []):
        if str(emb.get("target", "")).endswith("ConcatTimestepEmbedderND"):
            return int(emb["params"]["outdim"])
    return 256


def unet_config(sd: dict[str, torch.Tensor], original_config: dict, family: str, *, name: str) -> dict:
    """diffusers UNet2DConditionModel config from the ldm yaml."""
    try:
        cfg = sfu.create_unet_diffusers_config_from_ldm(original_config, sd)
    except (KeyError, TypeError, AssertionError) as exc:
        raise ModelError(f"{name}: the original config lacks U-Net settings ({exc!r})") from exc
    if family == "sdxl":
        # diffusers only recognises SDXL by its real context width; say it explicitly.
        cfg.update(class_embed_type=None, addition_embed_type="text_time",
                   addition_time_embed_dim=_time_embed_dim(original_config))
    in_ch = sd.get(sfu.LDM_UNET_KEY + "input_blocks.0.0.weight")
    if in_ch is not None and in_ch.shape[1] != cfg["in_channels"]:
        raise ModelError(f"{name}: the U-Net takes {in_ch.shape[1]} input channels (an inpainting or "
                         "other special model?); only 4-channel text-to-image models can be trained")
    cfg["sample_size"] = LATENT_SIZE[family]
    return cfg


def unet_from_ldm(sd: dict[str, torch.Tensor], original_config: dict, family: str, *,
                  name: str) -> UNet2DConditionModel:
    """The U-Net of an ldm state dict (keys model.diffusion_model.*)."""
    cfg = unet_config(sd, original_config, family, name=name)
    converted = sfu.convert_ldm_unet_checkpoint(sd, cfg)
    unet = build_empty(lambda: UNet2DConditionModel.from_config(cfg))
    return assign_load(unet, converted, what="U-Net", name=name)


def vae_from_ldm(sd: dict[str, torch.Tensor], original_config: dict, *, name: str,
                 pixel_size: int = 512) -> AutoencoderKL:
    """The VAE of an ldm state dict (first_stage_model.* or unprefixed keys)."""
    try:
        cfg = sfu.create_vae_diffusers_config_from_ldm(original_config, sd)
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{name}: the original config lacks VAE settings ({exc!r})") from exc
    cfg["sample_size"] = pixel_size
    converted = sfu.convert_ldm_vae_checkpoint(sd, cfg)
    vae = build_empty(lambda: AutoencoderKL.from_config(cfg))
    return assign_load(vae, converted, what="VAE", name=name)


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix<i>.` the keys show."""
    found = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len([i for i in found if i.isdigit()])


def vae_ddconfig_from_shapes(sd: dict[str, torch.Tensor], *, name: str) -> dict:
    """An ldm `ddconfig` read off the shapes of an unprefixed ldm VAE state dict."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = _count(sd, "encoder.down.")
        mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
        return {
            "double_z": sd["encoder.conv_out.weight"].shape[0] == 2 * sd["decoder.conv_in.weight"].shape[1],
            "z_channels": sd["decoder.conv_in.weight"].shape[1], "resolution": 256,
            "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_ch": sd["decoder.conv_out.weight"].shape[0],
            "ch": ch, "ch_mult": mult, "num_res_blocks": _count(sd, "encoder.down.0.block."),
            "attn_resolutions": [], "dropout": 0.0,
        }
    except KeyError as exc:
        raise ModelError(f"{name}: not a VAE (missing {exc.args[0]})") from exc


def strip_vae_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE keys without `first_stage_model.`/`vae.` (A1111 VAE files come both ways)."""
    for prefix in sfu.LDM_VAE_KEYS:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def vae_from_vae_file(sd: dict[str, torch.Tensor], *, name: str, scaling_factor: float) -> AutoencoderKL:
    """A separate ldm VAE file's state dict (A1111 `.vae.safetensors`/`.vae.pt`)."""
    sd = strip_vae_prefix(sd)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        raise ModelError(f"{name}: this VAE file is in diffusers layout; pass its folder (with config.json) instead")
    ddconfig = vae_ddconfig_from_shapes(sd, name=name)
    original = {"model": {"params": {"scale_factor": scaling_factor,
                                     "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    return vae_from_ldm(sd, original, name=name)


@torch.no_grad()
def looks_v_pred(unet: UNet2DConditionModel) -> bool:
    """A1111's SD2 test: at t=999 a v-model's output minus a flat 0.5 input averages below -1."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    t = torch.tensor([999], device=p.device)
    out = unet(x, t, encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1
