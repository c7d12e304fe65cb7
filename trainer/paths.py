"""Where the extension keeps its own files. Every folder can be moved by env var."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dir(env: str, default: Path) -> Path:
    value = os.environ.get(env)
    return Path(value).expanduser().resolve() if value else default


def cache_dir() -> Path:
    """Generated assets (tokenizer vocabulary, demo model); safe to delete."""
    return _dir("TRAINDECK_CACHE", ROOT / "cache")


def logs_dir() -> Path:
    """CSV logs, logs/YYYYMMDD/<name>-YYYYMMDD_HHMMSS.csv."""
    return _dir("TRAINDECK_LOGS", ROOT / "logs")


def presets_dir() -> Path:
    return _dir("TRAINDECK_PRESETS", ROOT / "presets")


def jsons_dir() -> Path:
    """Per-run settings JSON files (save_as_json)."""
    return _dir("TRAINDECK_JSONS", ROOT / "jsons")


def t5_tokenizer_candidates() -> list[Path]:
    """Where FLUX.1 jobs look for T5's tokenizer.json of their own, in order (install.py fetches it there)."""
    return [cache_dir() / "t5" / "tokenizer.json"]
