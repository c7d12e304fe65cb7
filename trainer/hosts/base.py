"""What the engine needs from whoever runs it: the standalone app or the WebUI.

The WebUI adapter implements the same protocol and is the only code that
imports the WebUI's `modules`.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from ..families.bundle import ModelBundle
from ..config.schema import TrainConfig
from ..training.events import Progress
from ..config.params import ConfigError

log = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")


class Host(Protocol):
    """Services the engine asks of its host."""

    name: str

    def lora_dir(self) -> Path: ...

    def list_models(self) -> list[str]:
        """Model names the UI offers (each one `load_bundle` accepts as cfg.model)."""
        ...

    def list_vaes(self) -> list[str]: ...

    def load_bundle(self, cfg: TrainConfig, *, dtype: torch.dtype, device: torch.device) -> ModelBundle: ...

    def encode_fn(self, bundle: ModelBundle) -> Callable[[list[str]], object] | None:
        """A prompt encoder of the host's own (None: the engine's)."""
        ...

    def session(self) -> AbstractContextManager[None]:
        """Held for the whole job: the host's GPU lock, release/restore of its model."""
        ...

    def progress(self, p: Progress) -> None: ...

    def saved(self, path: Path) -> None:
        """A network file was written (the host may refresh its LoRA list)."""
        ...


def model_names(folders: list[Path], *, vae: bool = False) -> list[str]:
    """Checkpoint files and diffusers folders under `folders`, as paths relative to their folder.

    A diffusers folder (it has model_index.json) is one model; the files inside it are not
    listed. With `vae`, only files are listed.
    """
    names: list[str] = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if (here / "model_index.json").is_file() and here != folder:
                dirnames[:] = []
                if not vae:
                    names.append(here.relative_to(folder).as_posix())
                continue
            names += [(here / f).relative_to(folder).as_posix() for f in sorted(filenames)
                      if not f.startswith(".") and Path(f).suffix.lower() in MODEL_EXTENSIONS]
    return list(dict.fromkeys(names))


def find_model(name: str, folders: list[Path], field: str = "model") -> Path:
    """A path as given, or a file/folder of that name (with or without extension) in `folders`."""
    if not name:
        raise ConfigError(field, name, "no model given; choose a checkpoint or pass --model")
    direct = Path(name).expanduser()
    if direct.exists():
        return direct
    for folder in folders:
        for candidate in (folder / name, *(folder / f"{name}{ext}" for ext in MODEL_EXTENSIONS)):
            if candidate.exists():
                return candidate
        hits = sorted(p for p in folder.rglob("*") if p.stem == Path(name).stem and
                      (p.suffix.lower() in MODEL_EXTENSIONS or (p / "model_index.json").is_file()))
        if hits:
            return hits[0]
    where = ", ".join(str(f) for f in folders) or "no model folder"
    raise ConfigError(field, name, f"not found as a path or in {where}")


class StandaloneHost:
    """Loads models from disk and keeps the last one for the next job."""

    name = "standalone"

    def __init__(self, lora_dir: Path | str, model_dirs: list[Path | str] = (), vae_dirs: list[Path | str] = (),
                 listener: Callable[[Progress], None] | None = None):
        self._lora_dir = Path(lora_dir)
        self.model_dirs = [Path(d) for d in model_dirs]
        self.vae_dirs = [Path(d) for d in vae_dirs] or self.model_dirs
        self.listener = listener
        self._lock = threading.Lock()
        self._cached: tuple[tuple, ModelBundle] | None = None

    def lora_dir(self) -> Path:
        return self._lora_dir

    def list_models(self) -> list[str]:
        return model_names(self.model_dirs)

    def list_vaes(self) -> list[str]:
        return model_names(self.vae_dirs, vae=True)

    def load_bundle(self, cfg: TrainConfig, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
        from ..families.loading import load_model

        path = find_model(cfg.model, self.model_dirs).resolve()
        vae = find_model(cfg.vae, self.vae_dirs, "vae").resolve() if cfg.vae else None
        parts = {role: str(find_model(getattr(cfg, role), self.model_dirs + self.vae_dirs, role).resolve())
                 for role in ("clip_l", "clip_g", "t5xxl", "ae", "qwen3") if getattr(cfg, role)}
        v_pred = True if cfg.model_v_pred else None
        # fp8 base weights change the loaded model, so such a model serves fp8 jobs only
        key = (str(path), str(vae), str(dtype), v_pred, tuple(sorted(parts.items())), bool(cfg.fp8_base))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # let the old model go before loading the next
        bundle = load_model(path, vae=vae, v_pred=v_pred, dtype=dtype, device=torch.device("cpu"),
                            components=parts)
        self._cached = (key, bundle)
        return bundle

    def encode_fn(self, bundle: ModelBundle) -> None:
        return None

    @contextmanager
    def session(self) -> Iterator[None]:
        # One job at a time per host, whoever calls.
        with self._lock:
            yield

    def progress(self, p: Progress) -> None:
        if self.listener is not None:
            self.listener(p)

    def saved(self, path: Path) -> None:
        log.info("saved %s", path)
