"""The training state saved next to a network file (``save_state``): ``<name>-state/``.

A state folder holds what the weights file alone cannot give back:

* ``weights.safetensors``: the raw trainable tensors as they were (the network file may hold the
  EMA weights or a lower save precision),
* ``optimizer.pt``: the optimizer, LR scheduler and gradient scaler state dicts,
* ``rng.pt``: the pass's generator, torch's global CPU (and accelerator) generators and the
  ``random.Random`` of any helper a mode keeps in ``ctx.state`` (e.g. the caption tricks),
* ``ema.safetensors``: the EMA shadows, when ``ema_decay`` is on,
* ``state.json``: the step, the data position, and what the state belongs to (the network
  file's sha256, network type, rank, alpha, optimizer).

``network_resume`` with such a folder continues at step k + 1 exactly as if the run had not
stopped; see ``resumestate.py`` for the reading side.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from .ema import EmaWeights
from ..fsutil import plain_write_mode

FORMAT = 1
INFO, OPTIM, RNG, WEIGHTS, EMA = "state.json", "optimizer.pt", "rng.pt", "weights.safetensors", "ema.safetensors"
REQUIRED = (INFO, OPTIM, RNG, WEIGHTS)


class CountedBatches(Iterator[Any]):
    """Wraps a mode's batch iterator to count the batches it gave; can skip ahead."""

    def __init__(self, inner: Iterator[Any]):
        self.inner = inner
        self.position = 0

    def __next__(self) -> Any:
        item = next(self.inner)
        self.position += 1
        return item

    def skip(self, count: int) -> None:
        """Advance ``count`` batches: cheaply when the iterator can skip, else by drawing them."""
        if hasattr(self.inner, "skip"):
            self.inner.skip(count)
        else:
            for _ in range(count):
                next(self.inner)
        self.position += count


def track_batches(state: dict[str, Any]) -> CountedBatches | None:
    """Count the batches of the mode's ``state["batches"]`` (None when the mode has none)."""
    inner = state.get("batches")
    if inner is None:
        return None
    counted = CountedBatches(inner)
    state["batches"] = counted
    return counted


@dataclass
class Live:
    """What a state folder captures from a running pass."""

    ctx: Any  # the StepContext
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: EmaWeights | None
    batches: CountedBatches | None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return trainable(self.optimizer)


def trainable(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The trained parameters in the optimizer's order (the order its state refers to)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_holders(state: dict[str, Any]) -> dict[str, random.Random]:
    """The ``random.Random`` objects a mode keeps in ``ctx.state`` (directly or as ``.rng``)."""
    out = {}
    for key, value in state.items():
        rng = value if isinstance(value, random.Random) else getattr(value, "rng", None)
        if isinstance(rng, random.Random):
            out[key] = rng
    return out


def device_rng(device: torch.device) -> torch.Tensor | None:
    """The accelerator's global generator state (None on the CPU or where torch has none)."""
    if device.type == "cpu":
        return None
    getter = getattr(torch.get_device_module(device), "get_rng_state", None)
    if getter is None:
        return None
    return getter() if device.type == "mps" else getter(device)


def rng_state(live: Live) -> dict[str, Any]:
    ctx = live.ctx
    return {"generator": ctx.generator.get_state(), "torch_cpu": torch.get_rng_state(),
            "torch_device": device_rng(ctx.device),
            "holders": {k: r.getstate() for k, r in rng_holders(ctx.state).items()}}


def describe(cfg: Any, step: int, network_file: Path, live: Live) -> dict[str, Any]:
    """state.json: the step, the data position and what the state belongs to."""
    return {
        "format": FORMAT, "step": step, "network_file": network_file.name,
        "network_sha256": sha256(network_file), "network_type": cfg.network_type,
        "network_rank": cfg.network_rank, "network_alpha": cfg.network_alpha,
        "train_optimizer": cfg.train_optimizer, "train_lr_scheduler": cfg.train_lr_scheduler,
        "train_iterations": cfg.train_iterations, "ema_decay": cfg.ema_decay,
        "data_position": live.batches.position if live.batches is not None else 0,
        "parameters": len(live.params), "saved_at": time.time(),
    }


def write_state(folder: Path, live: Live, cfg: Any, step: int, network_file: Path, overwrite: bool) -> Path:
    """Write ``folder`` atomically: into a temp folder first, then renamed into place.

    An existing folder is refused without ``overwrite``; with it, the old folder is moved aside
    only once the new one is complete, and removed after the rename.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"save_lora_name: {folder} already exists; set save_overwrite to replace it")
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, live, cfg, step, network_file)
        mode = plain_write_mode(tmp)
        for written in tmp.iterdir():  # safetensors 0.8 creates its files 0600
            if written.is_file():
                written.chmod(mode)
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _write_files(tmp: Path, live: Live, cfg: Any, step: int, network_file: Path) -> None:
    weights = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(live.params)}
    save_file(weights, str(tmp / WEIGHTS))
    if live.ema is not None:
        save_file(live.ema.state_dict(), str(tmp / EMA))
    has_state = live.scheduler is not None and hasattr(live.scheduler, "state_dict")
    sched = live.scheduler.state_dict() if has_state else None
    torch.save({"optimizer": live.optimizer.state_dict(), "scheduler": sched,
                "scaler": live.scaler.state_dict() if live.scaler is not None else None}, tmp / OPTIM)
    torch.save(rng_state(live), tmp / RNG)
    (tmp / INFO).write_text(json.dumps(describe(cfg, step, network_file, live), indent=2) + "\n", encoding="utf-8")
    for path in tmp.iterdir():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete ``tmp`` to ``folder``; an old folder is kept until the rename is done."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
    os.replace(folder, old)  # a directory cannot be renamed over a non-empty one
    try:
        os.replace(tmp, folder)
    except OSError:
        os.replace(old, folder)  # put the old state back rather than leave none
        raise
    shutil.rmtree(old)
