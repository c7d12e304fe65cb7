"""A WebUI to test the host adapter against: the stand-in `modules` package (tests/fakewebui)
and loaded models laid out the way A1111 and Forge hold them in memory."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn

from tests.ldm_export import _hf_clip, export_ldm, write_single_file
from tests.record_host import pattern, resolve

HERE = Path(__file__).resolve().parent
RECORD = HERE / "fixtures" / "host_record.json"
_FAKE_NAMES = ("modules", "networks", "modules_forge")


@contextmanager
def fake_webui(kind: str = "a1111") -> Iterator[SimpleNamespace]:
    """`modules`, `networks` (and for Forge `modules_forge`) importable, fresh, for one test."""
    paths = [str(HERE / "fakewebui")] + ([str(HERE / "fakewebui_forge")] if kind == "forge" else [])
    _purge()
    sys.path[:0] = paths
    try:
        from modules import call_queue, devices, script_callbacks, sd_models, shared

        import networks

        yield SimpleNamespace(shared=shared, call_queue=call_queue, devices=devices, sd_models=sd_models,
                              script_callbacks=script_callbacks, networks=networks)
    finally:
        for p in paths:
            sys.path.remove(p)
        _purge()


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_NAMES:
            del sys.modules[name]


def module_tree(sd: dict[str, torch.Tensor], copy: bool = True) -> nn.Module:
    """An nn.Module whose state_dict() is exactly `sd` (parameters at the dotted paths)."""
    root = nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part) or not isinstance(getattr(node, part), nn.Module):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        value = value.clone() if copy else value
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value))  # the WebUI leaves requires_grad on
        else:
            node.register_buffer(leaf, value)
    return root


def _hijacked(key: str) -> str:
    """A1111's hijack: text encoders under `.wrapped`, token embeddings wrapped for textual inversion."""
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.",
                   "cond_stage_model.model.", "conditioner.embedders.1.model."):
        if key.startswith(prefix):
            head, rest = prefix.rsplit(".", 2)[0], key[len(prefix.rsplit(".", 2)[0]) + 1:]
            key = f"{head}.wrapped.{rest}"
            break
    return key.replace("token_embedding.weight", "token_embedding.wrapped.weight")


def a1111_model(bundle, checkpoint: Path) -> nn.Module:
    """The ldm model A1111 has loaded: checkpoint-named weights, hijacked, with its flags.
    The checkpoint (and its .yaml) is written too."""
    write_single_file(bundle, checkpoint)
    return a1111_model_from_ldm(export_ldm(bundle), bundle.family.name, checkpoint, bundle.v_pred)


def a1111_model_from_ldm(sd: dict[str, torch.Tensor], family: str, checkpoint: Path, v_pred: bool,
                         copy: bool = True) -> nn.Module:
    """The model A1111 builds from a checkpoint's state dict (`copy=False` keeps the tensors)."""
    model = module_tree({_hijacked(k): v for k, v in sd.items()}, copy=copy)
    if family != "sdxl":  # ldm's LatentDiffusion keeps its DDPM schedule as buffers (in the record)
        for name, value in ddpm_buffers().items():
            model.register_buffer(name, value)
    if family == "sdxl":
        model.cond_stage_model = model.conditioner  # the alias sd_models_xl adds
    model.sd_checkpoint_info = _info(checkpoint)
    model.parameterization = "v" if v_pred else "eps"
    model.is_sd1, model.is_sd2, model.is_sdxl = (family == f for f in ("sd1", "sd2", "sdxl"))
    return model


def fp16_exact(bundle):
    """Round every weight of `bundle` to fp16 and back, so an fp16 copy of it holds the same values."""
    with torch.no_grad():
        for module in bundle.modules():
            for t in module.parameters():
                t.copy_(t.half().float())
    return bundle


def host_record() -> dict:
    """What tests/record_host.py recorded from the real WebUIs (tests/fixtures/host_record.json)."""
    return json.loads(RECORD.read_text(encoding="utf-8"))


def _as_recorded(sd: dict[str, torch.Tensor], keys: dict[str, list]) -> dict[str, torch.Tensor]:
    """Each tensor in the dtype the real host holds that key in (keys the record lacks keep theirs)."""
    out = {}
    for key, value in sd.items():
        dtype = keys.get(pattern(key), [None])[0]
        out[key] = value.to(getattr(torch, dtype)) if dtype and value.is_floating_point() else value
    return out


def _forge_clip(bundle) -> dict[str, torch.Tensor]:
    """Forge's joint text encoder: `clip_l/clip_h/clip_g.transformer.*` (transformers' layout, no
    position_ids buffer in its state dict), plus what its IntegratedCLIP adds: `logit_scale`, and for
    OpenCLIP-H a `text_projection` it never loads from the checkpoint."""
    names = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[bundle.family.name]
    clip: dict[str, torch.Tensor] = {}
    for name, te in zip(names, bundle.text_encoders):
        hf = {k: v for k, v in _hf_clip(te).items() if not k.startswith("text_model.text_projection")
              and not k.endswith("position_ids")}
        if getattr(te, "text_projection", None) is not None:
            hf["text_projection.weight"] = te.text_projection.weight.clone()
        elif name == "clip_h":
            hidden = te.config.hidden_size
            hf["text_projection.weight"] = torch.randn(hidden, hidden)
        clip.update({f"{name}.transformer.{k}": v for k, v in hf.items()})
        clip[f"{name}.logit_scale"] = torch.tensor(4.6052)
    return clip


def _add_aliases(root: nn.Module, aliases: list[str]) -> None:
    """`a.b.wrapped.weight` names the Parameter `a.b.weight` a second time (Forge's TI wrapper)."""
    for alias in aliases:
        owner_path = alias[: -len(".wrapped.weight")]
        owner = root.get_submodule(owner_path)
        owner.add_module("wrapped", nn.Module())
        owner.wrapped.weight = owner.weight


def ddpm_buffers(steps: int = 1000) -> dict[str, torch.Tensor]:
    """The schedule buffers ldm's DDPM registers (scaled-linear betas 0.00085-0.012), by its formulas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post = betas * (1 - prev) / (1 - ac)
    out = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
           "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
           "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
           "posterior_variance": post, "posterior_log_variance_clipped": post.clamp(min=1e-20).log(),
           "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
           "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac)}
    return {k: v.float() for k, v in out.items()}


def forge_model(bundle, checkpoint: Path) -> SimpleNamespace:
    """Forge's engine object built from the host record: its parts apart, each key in the recorded dtype,
    the recorded aliases, inference tensors, and a LoraLoader (empty backup) where the record found one.
    Call fp16_exact(bundle) first where the copy must equal the source."""
    rec = host_record()["forge"]
    fam = rec[bundle.family.name]
    ldm = export_ldm(bundle)
    unet = {k[len("model.diffusion_model."):]: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    vae = {k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    with torch.inference_mode(rec["sd1"]["unet"]["inference"]):  # sd2/sdxl were recorded on meta
        parts = [module_tree(_as_recorded(part, fam[name]["keys"]))
                 for name, part in (("unet", unet), ("vae", vae), ("clip", _forge_clip(bundle)))]
        _add_aliases(parts[2], fam["clip"]["aliases"])
    parts[0].storage_dtype = getattr(torch, fam["unet_storage_dtype"])  # Forge's U-Net says how it is stored
    kmodel = nn.Module()
    kmodel.diffusion_model = parts[0]
    kmodel.predictor = SimpleNamespace(prediction_type="v_prediction" if bundle.v_pred else "epsilon")
    objects = SimpleNamespace(unet=SimpleNamespace(model=kmodel), vae=SimpleNamespace(first_stage_model=parts[1]),
                              clip=SimpleNamespace(cond_stage_model=parts[2]))
    write_single_file(bundle, checkpoint)
    model = SimpleNamespace(forge_objects=objects, sd_checkpoint_info=_info(checkpoint),
                            **{flag: bundle.family.name == flag[3:] for flag in ("is_sd1", "is_sd2", "is_sdxl")})
    for where in rec["sd1"]["lora"].values():
        holder = resolve(model, where["holder"])
        holder.lora_loader = SimpleNamespace(backup={}, loaded_hash=str([]))
    return model


def _info(checkpoint: Path) -> SimpleNamespace:
    from modules import sd_models

    info = sd_models.checkpoint_info(checkpoint, Path(checkpoint).stem)
    sd_models.checkpoints_list[info.title] = info
    return info


def host_tensors(model) -> list[torch.Tensor]:
    """Every tensor of a loaded host model, in a fixed order."""
    if hasattr(model, "forge_objects"):
        o = model.forge_objects
        modules = [o.unet.model.diffusion_model, o.vae.first_stage_model, o.clip.cond_stage_model]
        return [t for m in modules for _, t in sorted(m.state_dict().items())]
    return [t for _, t in sorted(model.state_dict().items())]


def endpoints(routes: list) -> list:
    """An app's endpoint routes: FastAPI from 0.137 keeps an included router as one entry
    (``original_router`` holds its routes), earlier versions copy its routes in."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(endpoints(inner.routes) if inner is not None else [route])
    return out
