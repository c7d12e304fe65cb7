"""safetensors header metadata: kohya ``ss_*`` keys, ``modelspec.*`` keys and our settings.

Every value is a string (the safetensors header allows nothing else).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any


SETTINGS_KEY = "traindeck_settings"  # the full preset-shaped settings (TrainConfig.to_dict())
EXTRA_KEY = "traindeck_extra"  # run facts that are not settings (pass, model hash…)
STRENGTH_KEY = "traindeck_network_strength"  # the strength baked into the tensors
_LYCORIS_ALGOS = {"lierla": "lora", "c3lier": "locon", "loha": "loha", "lokr": "lokr"}
_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def uses_lycoris(cfg) -> bool:
    """True when only LyCORIS (not kohya's networks.lora) describes the file."""
    return cfg.network_type not in ("lierla", "c3lier") or bool(cfg.network_dora)


def network_module(cfg) -> str:
    """kohya's ss_network_module. TrainTrain writes networks.lora even for LoHa; we don't."""
    return "lycoris.kohya" if uses_lycoris(cfg) else "networks.lora"


def network_args(cfg) -> dict[str, str]:
    """kohya's ss_network_args (values as strings, as kohya stores them).

    conv_dim/conv_alpha appear only where 3x3 convs are trained: LyCORIS reads a
    conv_dim of "0" as "use the rank", so lierla writes none.
    """
    args: dict[str, str] = {"algo": _LYCORIS_ALGOS[cfg.network_type]}
    if cfg.network_type != "lierla":
        args["conv_dim"] = str(int(cfg.network_conv_rank or cfg.network_rank))
        args["conv_alpha"] = _num(cfg.network_conv_alpha or cfg.network_alpha)
    if cfg.network_dora:
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(bool(cfg.network_dora_on_output))
    args.update(_training_args(cfg))
    return args


_KOHYA_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def _training_args(cfg) -> dict[str, str]:
    """LoRA+ ratios, sd-scripts' block LR weights and per-block ranks, under sd-scripts' names.

    block_dims/block_alphas list all 25 U-Net blocks (IN00-IN11, M00, OUT00-OUT11) as
    sd-scripts does; alphas keep the alpha/rank ratio, as training did.
    """
    from .blockctl import block_dims

    args: dict[str, str] = {}
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(cfg, key, None)
        if value is not None and (value > 0 or key != "loraplus_lr_ratio"):
            args[key] = _num(value)
    for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        if getattr(cfg, key, ""):
            args[key] = str(getattr(cfg, key))
    dims = block_dims(cfg)
    if any(b in dims for b in _KOHYA_BLOCKS):
        rank, alpha = int(cfg.network_rank), float(cfg.network_alpha)
        per_block = [dims.get(b, rank) for b in _KOHYA_BLOCKS]
        args["block_dims"] = ",".join(str(d) for d in per_block)
        args["block_alphas"] = ",".join(_num(alpha * d / rank) for d in per_block)
    return args


def file_name_only(value: str) -> str:
    """The last part of a path ('C:\\a\\m.safetensors' and '/a/m.safetensors' give 'm.safetensors').

    People share LoRA files: their headers must not carry the trainer's disk layout
    (user names, folder names). A WebUI title like 'm.safetensors [abc123]' is kept whole.
    """
    text = str(value)
    if not text:
        return text
    return PureWindowsPath(PurePosixPath(text).name).name


def shareable_settings(settings: dict[str, Any], path_keys: set[str]) -> dict[str, Any]:
    """Preset-shaped settings with every path field reduced to its file or folder name."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out[key] = shareable_settings(value, path_keys)
        elif key in path_keys and isinstance(value, str):
            out[key] = file_name_only(value)
        else:
            out[key] = value
    return out


def _path_keys(cfg) -> set[str]:
    return {p.key for _, p in type(cfg).params() if p.kind == "path"}


def _num(x: float) -> str:
    """8.0 -> '8.0', 1e-4 -> '0.0001': kohya writes Python's str() of the number."""
    return str(float(x))


def _architecture(bundle, cfg) -> str:
    # a family that tells its variants apart by the model (FLUX dev/schnell, SD3 medium/large) says so
    arch = bundle.family.metadata(bundle).get("modelspec.architecture") or bundle.family.architecture(bundle.v_pred)
    return f"{arch}/{'lycoris' if uses_lycoris(cfg) else 'lora'}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def build_metadata(cfg, bundle, *, seed: int, steps: int, started_at: float, finished_at: float | None,
                   num_images: int, tag_frequency: dict, resolution: tuple[int, int],
                   extra_settings: dict) -> dict[str, str]:
    """Header metadata for a saved network.

    `resolution` is (width, height), kohya's order (cfg.image_size is the other
    way round); ss_resolution is written "(width, height)" and
    modelspec.resolution "WIDTHxHEIGHT".
    `finished_at` None (an intermediate save) leaves ss_training_finished_at out.
    """
    width, height = (int(v) for v in resolution)
    trains_te = cfg.trains_text_encoder and cfg.network_element == "Full"
    meta: dict[str, Any] = {
        "ss_network_module": network_module(cfg),
        "ss_network_dim": str(int(cfg.network_rank)),
        "ss_network_alpha": _num(cfg.network_alpha),
        "ss_network_args": json.dumps({**network_args(cfg), **bundle.family.network_args(cfg)}),
        "ss_learning_rate": _num(cfg.train_learning_rate),
        "ss_unet_lr": _num(cfg.train_learning_rate),
        "ss_text_encoder_lr": _num(cfg.text_encoder_lr if trains_te else 0.0),
        "ss_max_train_steps": str(int(cfg.train_iterations)),
        "ss_steps": str(int(steps)),  # steps actually done (fewer after Stop and Save)
        "ss_lr_scheduler": cfg.train_lr_scheduler,
        "ss_optimizer": _optimizer(cfg),
        "ss_seed": str(int(seed)),
        **bundle.family.metadata(bundle),  # ss_base_model_version, ss_v2, ss_v_parameterization, implementation
        "ss_sd_model_name": file_name_only(bundle.name),
        "ss_resolution": f"({width}, {height})",
        "ss_training_started_at": repr(float(started_at)),
        "ss_output_name": cfg.save_lora_name,
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_num_train_images": str(int(num_images)),
        "ss_mixed_precision": _PRECISION[cfg.train_model_precision],
        "ss_min_snr_gamma": _num(cfg.train_snr_gamma),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(bundle, cfg),
        "modelspec.title": cfg.save_lora_name,
        "modelspec.date": _iso(finished_at if finished_at is not None else started_at),
        "modelspec.resolution": f"{width}x{height}",
        SETTINGS_KEY: json.dumps(shareable_settings(cfg.to_dict(), _path_keys(cfg)), ensure_ascii=False),
    }
    if finished_at is not None:
        meta["ss_training_finished_at"] = repr(float(finished_at))
    if extra_settings:
        meta[EXTRA_KEY] = json.dumps(extra_settings, ensure_ascii=False, default=str)
    return {k: str(v) for k, v in meta.items()}


def _optimizer(cfg) -> str:
    """'AdamW' or 'AdamW(weight_decay=0.01; betas=(0.9,0.99))' like kohya's name(args)."""
    settings = "; ".join(line.strip() for line in cfg.train_optimizer_settings.splitlines() if line.strip())
    return f"{cfg.train_optimizer}({settings})" if settings else cfg.train_optimizer
