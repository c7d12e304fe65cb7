"""Model families: one strategy file per family (sd1, sd2, sdxl, flux), one protocol (base.Family).

`get_family` turns a name into the family object the rest of the trainer asks; `detect_family`
tells a checkpoint's family from its keys. Loading, prompt encoding, block IDs, file keys and
the sampling pipeline of each family live in this package, and nowhere else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from .base import Family
from .flux import Flux
from .sd1 import SD1
from .sd2 import SD2
from .sd3 import SD3
from .sdxl import SDXL
from .zimage import ZImage
from .zimage_load import has_zimage

# Families that are not SD U-Nets are asked first (their keys are unambiguous); the SD U-Nets
# are told apart by checkpoint.detect_unet_family.
# Z-Image is offered only where diffusers has its transformer (>= 0.36); elsewhere its files are refused.
FAMILIES: dict[str, Family] = {
    f.name: f for f in (SD1(), SD2(), SDXL(), Flux(), SD3(), *((ZImage(),) if has_zimage() else ()))}

# Every family's label, offered here or not (help texts name the families a setting is for).
LABELS: dict[str, str] = {cls.name: cls.label for cls in (SD1, SD2, SDXL, Flux, SD3, ZImage)}

__all__ = ["FAMILIES", "LABELS", "Family", "detect_family", "family_names", "file_family", "get_family"]


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get_family(family: str | Family) -> Family:
    """The family object for a name (a Family passes through)."""
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except (KeyError, TypeError):
        raise ValueError(f"family: expected one of {family_names()}, got {family!r}") from None


def detect_family(keys: Iterable[str] | Mapping[str, torch.Tensor], *, name: str = "state dict") -> Family:
    """The family of a checkpoint (ldm / A1111 keys, or a diffusers U-Net state dict)."""
    from .checkpoint import detect_unet_family

    state_dict = keys if isinstance(keys, Mapping) else {}
    key_list = list(keys)
    for family in FAMILIES.values():
        if family.claims(key_list, state_dict):
            return family
    return FAMILIES[detect_unet_family(state_dict or key_list, name=name)]


def file_family(path: str | Path) -> str | None:
    """The family name of a model file or diffusers folder from its header alone (no tensor is read);
    None when it cannot be told (a missing or unreadable file, another kind of file)."""
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            kind = str(index.get("_class_name", ""))
            if kind.startswith("Flux"):
                return "flux"
            if kind.startswith("StableDiffusion3"):
                return "sd3"
            if kind.startswith("ZImage"):
                return "zimage" if "zimage" in FAMILIES else None
            if "XL" in kind:
                return "sdxl"
            return None
        if path.suffix.lower() not in (".safetensors", ".sft"):
            return None
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
        return detect_family(keys, name=str(path)).name
    except (OSError, ValueError, SafetensorError):
        return None
