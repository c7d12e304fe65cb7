"""Every check a job can pass before its turn, run when the job is added.

The Train tab, the queue's API and the CLI all call `precheck`, so a job that would fail
on a missing folder, an empty folder, a taken output name, a pair of different sizes or a
network file that is not there is refused at once, with a ConfigError naming the preset key
(the UI turns the key into the field's label). Nothing here loads a model: it reads folder
listings, image headers and file names only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.schema import TrainConfig
from ..config.params import ConfigError

# Modes that train on a folder of images (Multi-ADDifT's pairs are checked by its mode).
_FOLDER_MODES = ("LoRA",)


def check_data(cfg: TrainConfig) -> None:
    """The image folder exists and holds images (LoRA); pairs match in size (the pair modes)."""
    if cfg.mode in _FOLDER_MODES:
        from ..data.scan import DATA_KEY, find_images

        text = cfg.lora_data_directory.strip()
        if not text:
            raise ConfigError(DATA_KEY, cfg.lora_data_directory, "no image folder given")  # scan_images's words
        root = Path(text).expanduser()
        if not root.is_dir():
            raise ConfigError(DATA_KEY, text, "folder does not exist" if not root.exists() else "is not a folder")
        if not find_images(root):
            from ..data.scan import IMAGE_EXTENSIONS

            exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            raise ConfigError(DATA_KEY, text, f"folder has no images ({exts}), also searching subfolders")


def check_network_files(cfg: TrainConfig, lora_dir: Path) -> None:
    """A network to resume or to load as Difference's first pass must exist."""
    from ..training.outputs import find_network_file

    for key in ("network_resume", "diff_load_1st_pass"):
        value = getattr(cfg, key).strip()
        if value and cfg.mode in TrainConfig.param_for(key)[1].modes and find_network_file(value, lora_dir) is None:
            raise ConfigError(key, value, f"file not found (as a path or in the LoRA folder {lora_dir})")


def check_outputs(cfg: TrainConfig, lora_dir: Path) -> None:
    """Every pass that saves has free output names (or save_overwrite); the pair modes' files check here."""
    from ..modes import get_mode
    from ..training.outputs import plan_outputs

    for spec in get_mode(cfg.mode).passes(cfg):  # a pair mode checks its images here
        if spec.save:
            plan_outputs(spec.cfg, lora_dir, spec.suffix)


def check_model(cfg: TrainConfig, host: Any) -> None:
    """A model or VAE given by name or path resolves on a host that reads models from folders."""
    model_dirs = getattr(host, "model_dirs", None)
    if model_dirs is None:  # the WebUI's host: an empty model means the loaded one
        return
    from ..hosts.base import find_model

    if cfg.model:
        find_model(cfg.model, model_dirs)
    if cfg.vae:
        find_model(cfg.vae, getattr(host, "vae_dirs", model_dirs), "vae")


def precheck(cfg: TrainConfig, lora_dir: Path | str, host: Any = None) -> TrainConfig:
    """Validate `cfg` and run every check that needs no model; returns `cfg` or raises ConfigError."""
    cfg.validate()
    check_data(cfg)
    check_network_files(cfg, Path(lora_dir))
    check_outputs(cfg, Path(lora_dir))
    if host is not None:
        check_model(cfg, host)
    return cfg


__all__ = ["check_data", "check_model", "check_network_files", "check_outputs", "precheck"]
