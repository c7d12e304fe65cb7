"""Helpers for tests/test_bad_inputs.py: a context per row, bad files, entry points, snapshots.

Each row of the table makes one bad input under ``Ctx.tmp`` and hands it to an entry point
(``ENTRIES``), which returns the refused field and the message. Snapshots cover the whole
tmp folder, so nothing may appear or change anywhere (the output folder, logs/, jsons/).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zlib
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer.families.bundle import ModelBundle
from trainer.families.checkpoint import ModelError
from trainer.cli import EXIT_BAD_INPUT, main
from trainer.config.schema import TrainConfig
from trainer.training.engine import Trainer
from trainer.networks.metadata import STRENGTH_KEY
from trainer.families.loading import load_model
from trainer.networks.network import Network
from trainer.config.params import ConfigError
from trainer.training.plot import resolve_log
from trainer.config.presets import load_preset

from tests.enginekit import MemoryHost, quick_config
from tests.modekit import write_pair

NAME = "tiny"  # quick_config's save_lora_name; every row finds an existing <lora dir>/tiny.safetensors
EXISTING = b"an existing LoRA that must survive"


@dataclass
class Ctx:
    """What a row needs: a tmp folder with good images, the output folder, a model and a bundle."""

    tmp: Path
    data: Path
    out: Path
    logs: Path
    bundle: ModelBundle
    model_file: Path
    mp: pytest.MonkeyPatch

    def job(self, **over: Any) -> TrainConfig:
        """A valid one-step LoRA job that may replace its output (and must not, when it fails)."""
        return quick_config(self.data, train_iterations=1, train_batch_size=1, save_overwrite=True, **over)

    def pair_job(self, orig: Path | str | None = None, targ: Path | str | None = None, mode: str = "Difference",
                 **over: Any) -> TrainConfig:
        """A pair job: the good pair unless `orig`/`targ` replace one of its images."""
        good_o, good_t = write_pair(self.tmp / "pair")
        return self.job(mode=mode, diff_original_image=str(orig if orig is not None else good_o),
                        diff_target_image=str(targ if targ is not None else good_t),
                        **{"original_prompt": "a pattern", "target_prompt": "a pattern, patch", **over})

    def __post_init__(self) -> None:
        (self.tmp / "job.json").write_text(json.dumps(self.job().to_dict()), encoding="utf-8")  # the CLI's preset

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---- bad files ---------------------------------------------------------------------------------
def png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A good RGB image of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (with a valid CRC) and holds no pixels: a bomb that costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def corrupt(path: Path) -> Path:
    """A PNG signature followed by noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def truncated(path: Path) -> Path:
    """A good PNG cut in half: its header reads, its pixels do not."""
    raw = png(path).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


class Pwn:
    """Unpickling this runs `touch <marker>`; weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def evil_ckpt(c: Ctx, raw: bool = False) -> Path:
    """torch.save's zip format, or (`raw`) a bare pickle as old .pt files are; either would run `touch`."""
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Pwn(c.tmp / "pwned")}
    path = c.tmp / ("evil.pt" if raw else "evil.ckpt")
    if raw:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path)
    return path


def network_file(c: Ctx, name: str, strength: str | None = None, **over: Any) -> Path:
    """A network file as a job with `over` would save it (untrained), built on the shared bundle."""
    net = Network.build(c.bundle, c.job(**over))
    try:
        path = c.tmp / f"{name}.safetensors"
        save_file(net.state_dict_kohya(), str(path), metadata={STRENGTH_KEY: strength or "1.0"})
    finally:
        net.remove()
    return path


def unlistable(c: Ctx) -> Path:
    """A folder the OS refuses to list. Root (CI containers) reads through chmod 000, so the
    refusal is raised where os.walk lists folders."""
    folder = c.folder("locked")
    png(folder / "a.png")
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(os.fsdecode(path)) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(path)

    c.mp.setattr(os, "scandir", scandir)
    return folder


# ---- entry points: each returns (field named, message) ------------------------------------------
def run_trainer(c: Ctx, cfg: TrainConfig) -> tuple[str | None, str]:
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, MemoryHost(c.out, bundle=c.bundle), device="cpu").run()
    return err.value.key, str(err.value)


def run_cli(c: Ctx, extra: list[str]) -> tuple[str | None, str]:
    """`python -m trainer` in-process on the job preset; `extra` comes last (a later --preset wins)."""
    preset = c.tmp / "job.json"
    argv = ["--preset", str(preset), "--model", str(c.model_file), "--lora-dir", str(c.out), "--quiet", *extra]
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main(argv)
    assert code == EXIT_BAD_INPUT, stderr.getvalue()
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr.getvalue()
    return errors[0].removeprefix("error: ").split(":")[0], errors[0]


def run_preset(c: Ctx, path: Path) -> tuple[str | None, str]:
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    return err.value.key, str(err.value)


def run_log(c: Ctx, name: str) -> tuple[str | None, str]:
    with pytest.raises(ConfigError) as err:
        resolve_log(name, root=c.logs)
    return err.value.key, str(err.value)


def run_model(c: Ctx, path: Path) -> tuple[str | None, str]:
    """ModelError carries no field; it names the file first, so the 'field' is 'model' when it does."""
    with pytest.raises(ModelError) as err:
        load_model(path)
    return ("model" if str(err.value).startswith(f"{path}: ") else None), str(err.value)


ENTRIES: dict[str, Callable[[Ctx, Any], tuple[str | None, str]]] = {
    "trainer": run_trainer, "cli": run_cli, "preset": run_preset, "log": run_log, "model": run_model}


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---- snapshots and health -----------------------------------------------------------------------
def snapshot(root: Path, rel: str = "") -> dict[str, tuple]:
    """Every folder and file under `root`: kind, size, mtime and sha256 (links by their target).

    Lists with os.listdir, not os.walk/os.scandir, which a row may have replaced.
    """
    out: dict[str, tuple] = {}
    for name in sorted(os.listdir(root / rel if rel else root)):
        key = f"{rel}/{name}" if rel else name
        path = root / key
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_dir():
            out[key] = ("dir",)
            out.update(snapshot(root, key))
        else:
            st = path.stat()
            out[key] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def fingerprint(bundle: ModelBundle) -> tuple:
    """Module names, hooks and a weight checksum: a failed job must leave the model exactly as it was."""
    names = tuple(n for m in bundle.modules() for n, _ in m.named_modules())
    hooked = sum("forward" in sub.__dict__ for m in bundle.modules() for sub in m.modules())
    total = sum(float(p.detach().double().sum()) for m in bundle.modules() for p in m.parameters())
    return names, hooked, total, torch.is_grad_enabled(), Image.MAX_IMAGE_PIXELS


def train_once(c: Ctx, folder: Path, name: str = "healthy", data: Path | None = None) -> Path:
    """A small valid job on the shared bundle in this process; returns the file it saved."""
    cfg = quick_config(data or c.data, train_iterations=2, train_batch_size=1, save_lora_name=name)
    result = Trainer(cfg, MemoryHost(folder, bundle=c.bundle), device="cpu").run()
    assert result.status == "done" and result.steps == 2
    assert result.output == folder / f"{name}.safetensors" and result.output.stat().st_size > 0
    return result.output
