"""Preset files (TrainTrain's JSON format) <-> TrainConfig, and per-run settings JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .schema import TrainConfig
from ..fsutil import check_name, unique_path, write_json_atomic
from .params import ConfigError
from ..paths import jsons_dir, presets_dir


def read_json(path: Path, field: str = "preset") -> Any:
    """Parse a JSON file (UTF-8 with or without BOM, any line endings)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(field, str(path), "file not found") from None
    except OSError as exc:
        raise ConfigError(field, str(path), f"cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(field, str(path), f"is not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(field, str(path), f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a number json cannot convert, e.g. an integer of over 4300 digits
        raise ConfigError(field, str(path), f"is not usable JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(field, str(path), "is not usable JSON: it nests too deeply") from None


def preset_path(name_or_path: str | Path, folder: Path | None = None) -> Path:
    """A preset by file path, or by name inside the presets folder."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".json" and path.exists():
        return path
    name = str(name_or_path)
    check_name("preset", name.removesuffix(".json"))
    return (folder or presets_dir()) / f"{name.removesuffix('.json')}.json"


def load_preset(name_or_path: str | Path, folder: Path | None = None,
                warnings: list[str] | None = None) -> TrainConfig:
    """Load a preset file (TrainTrain's own files load unchanged)."""
    path = preset_path(name_or_path, folder)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError("preset", str(path), f"expected a JSON object of settings, found a {type(data).__name__}")
    return TrainConfig.from_dict(data, warnings=warnings)


def list_presets(folder: Path | None = None) -> list[str]:
    folder = folder or presets_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def save_preset(cfg: TrainConfig, name: str, folder: Path | None = None, overwrite: bool = False) -> Path:
    """Write `cfg` as presets/<name>.json; an existing preset is kept unless `overwrite`."""
    check_name("preset", name)
    path = (folder or presets_dir()) / f"{name}.json"
    if path.exists() and not overwrite:
        raise ConfigError("preset", name, f"{path} already exists; choose another name or allow overwriting")
    return write_json_atomic(path, cfg.to_dict(), overwrite=overwrite)


def save_run_settings(cfg: TrainConfig, seed: int, started: float, folder: Path | None = None) -> Path:
    """jsons/YYYYMMDD/<name>-YYYYMMDD_HHMMSS.json: the exact settings of a run, seed included."""
    stamp = time.localtime(started)
    day, full = time.strftime("%Y%m%d", stamp), time.strftime("%Y%m%d_%H%M%S", stamp)
    data = cfg.to_dict()
    data["train_seed"] = seed
    path = unique_path((folder or jsons_dir()) / day / f"{cfg.save_lora_name}-{full}.json")
    return write_json_atomic(path, data, overwrite=False)
