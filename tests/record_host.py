"""Record, from a real WebUI, the facts the host adapter depends on (never weights).

    cd FORGE_DIR && FORGE_PYTHON TRAINDECK/tests/record_host.py forge --ckpt CKPT --always-cpu
    cd A1111_DIR && A1111_PYTHON TRAINDECK/tests/record_host.py a1111 --ckpt CKPT --use-cpu all --no-half

It starts the WebUI's own initialisation in this process (no server), loads CKPT the way the WebUI
does, encodes a prompt (Forge casts embeddings on first use), merges a zero LoRA patch the way the
WebUI's LoRA code does, and writes what it sees into tests/fixtures/host_record.json under the
host's name: per object, each state-dict key pattern (digits as #) with its dtype and rank, the
aliases, whether the tensors are inference tensors, and where merged-LoRA backups live. On Forge it
also builds SD2 and SDXL from Forge's own loader on the meta device (no memory, no file) and records
their layouts. The tests' stand-ins (tests/webuikit.py) build their objects from this record, and
tests/test_host_record.py fails when the two disagree. Arguments after the host name go to the WebUI.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "host_record.json"
DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")


def pattern(key: str) -> str:
    return DIGITS.sub("#", key)


def describe(module, path: str) -> dict:
    """Key patterns -> [dtype, rank], the `.wrapped` aliases (keys naming a tensor another key names too)."""
    sd = module.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    aliases, keys = [], {}
    for key, value in sd.items():
        ident = id(value)
        if ident in seen and ".wrapped." in key:
            aliases.append(pattern(key))
            continue
        seen.setdefault(ident, key)
        keys[pattern(key)] = [str(value.dtype).replace("torch.", ""), value.dim()]
    tensors = [v for v in sd.values() if v.device.type != "meta"]
    return {"path": path, "keys": dict(sorted(keys.items())), "aliases": sorted(set(aliases)),
            "inference": all(t.is_inference() for t in tensors) if tensors else None}  # None: built on meta


def resolve(obj, path: str):
    """obj.a.b.c for path "a.b.c"."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def forge_lora(sd_model) -> dict:
    """Merge a zero patch through Forge's patcher, see where the backup lands, take it out again."""
    import torch

    out = {}
    for part, patcher, key in (("unet", sd_model.forge_objects.unet, "diffusion_model.input_blocks.1.1.proj_in.weight"),
                               ("clip", sd_model.forge_objects.clip.patcher,
                                next(k for k, _ in sd_model.forge_objects.clip.cond_stage_model.named_parameters()
                                     if k.endswith("layers.0.mlp.fc1.weight")))):
        clone = patcher.clone()
        weight = dict(clone.model.named_parameters())[key]
        clone.add_patches(filename="record", patches={key: (torch.zeros_like(weight),)})
        clone.refresh_loras()
        loader = clone.model.lora_loader
        holder = "forge_objects.unet.model" if part == "unet" else "forge_objects.clip.cond_stage_model"
        assert clone.model is resolve(sd_model, holder)
        out[part] = {"holder": holder, "loader": f"{holder}.lora_loader", "backup_attr": "backup",
                     "backup_keys": [pattern(k) for k in loader.backup], "replaced": dict(clone.model.named_parameters())[key] is not weight,
                     "loaded_hash_after_merge": loader.loaded_hash != str([])}
        patcher.clone().refresh_loras()  # no patches: the backup goes back
        out[part]["backup_after_plain_refresh"] = len(loader.backup)
    return out


def forge_objects(sd_model) -> dict:
    o = sd_model.forge_objects
    return {"unet": describe(o.unet.model.diffusion_model, "forge_objects.unet.model.diffusion_model"),
            "vae": describe(o.vae.first_stage_model, "forge_objects.vae.first_stage_model"),
            "clip": describe(o.clip.cond_stage_model, "forge_objects.clip.cond_stage_model"),
            "prediction_type": o.unet.model.predictor.prediction_type,
            "unet_storage_dtype": str(getattr(o.unet.model.diffusion_model, "storage_dtype", None)).replace("torch.", ""),
            "flags": {f: bool(getattr(sd_model, f, False)) for f in ("is_sd1", "is_sd2", "is_sdxl")}}


def record_forge(ckpt: str) -> dict:
    import torch
    import webui  # noqa: F401 (Forge's initialisation, as launch.py runs it)
    from modules import sd_models, shared
    from modules_forge import main_entry

    main_entry.refresh_model_loading_parameters()  # what building the UI does: the --ckpt checkpoint
    sd_model, _ = sd_models.forge_model_reload()
    with torch.inference_mode():
        sd_model.get_learned_conditioning(["a photo of a cat"])
    out = {"commit": Path(".forge_commit").read_text().strip() if Path(".forge_commit").is_file() else "",
           "flags": " ".join(sys.argv[1:]), "sd1": forge_objects(sd_model)}
    out["sd1"]["lora"] = forge_lora(sd_model)
    out["sd1"]["clip_skip_setter"] = hasattr(sd_model, "set_clip_skip")
    shared.sd_model = None
    del sd_model
    for family, repo in (("sd2", "stabilityai/stable-diffusion-2-1"), ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")):
        out[family] = forge_objects(forge_meta_model(family, repo))
    return out


def forge_meta_model(family: str, repo: str):
    """Forge's own loader on a meta-device checkpoint with the family's real keys and shapes."""
    import torch
    from backend import loader, memory_management

    sd = meta_checkpoint(family, Path("backend/huggingface") / repo)
    meta = torch.device("meta")
    loader.load_torch_file = lambda *_a, **_k: dict(sd)
    memory_management.cpu = meta
    memory_management.get_torch_device = lambda: meta
    memory_management.unet_inital_load_device = lambda *a, **k: meta
    return loader.forge_loader(f"/nonexistent/{family}.safetensors")


def meta_checkpoint(family: str, repo: Path) -> dict:
    """The family's ldm checkpoint keys and shapes (meta tensors) from Forge's shipped diffusers configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.ldm_export import export_ldm
    from trainer.families.bundle import ModelBundle

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(repo / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(repo / "vae"))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(repo / "text_encoder"))]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(repo / "text_encoder_2")))
        bundle = ModelBundle(family=family, unet=unet, vae=vae, text_encoders=tes, tokenizers=[None] * len(tes),
                             noise_scheduler=None)
        return export_ldm(bundle)


def record_a1111(ckpt: str) -> dict:
    import torch
    import webui  # noqa: F401
    from modules import initialize, shared

    initialize.initialize()  # loads the --ckpt checkpoint on a thread; shared.sd_model waits for it
    model = shared.sd_model
    with torch.no_grad():
        model.get_learned_conditioning(["a photo of a cat"])
    lora = {"backup_attr": "network_weights_backup", "names_attr": "network_current_names",
            "has_networks_module": "networks" in sys.modules}
    return {"version": "v1.10.1", "flags": " ".join(sys.argv[1:]),
            "sd1": {"model": describe(model, "shared.sd_model"), "lora": lora,
                    "parameterization": getattr(model, "parameterization", None),
                    "flags": {f: bool(getattr(model, f, False)) for f in ("is_sd1", "is_sd2", "is_sdxl")}}}


def dumps(data: dict) -> str:
    """Indented JSON with each [dtype, rank] pair on its key's line (one line per key pattern)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    return re.sub(r'\[\n\s+("[^"\n]*"),\n\s+(\d+)\n\s+\]', r"[\1, \2]", text) + "\n"


def main() -> int:
    host, args = sys.argv[1], sys.argv[2:]
    sys.path[0] = os.getcwd()  # the WebUI's folder, not tests/
    ckpt = args[args.index("--ckpt") + 1]
    sys.argv = [sys.argv[0], "--skip-prepare-environment", "--skip-install", "--skip-version-check", *args]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record = record_forge(ckpt) if host == "forge" else record_a1111(ckpt)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    data[host] = record
    FIXTURE.write_text(dumps(data))
    print(f"recorded {host} into {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
