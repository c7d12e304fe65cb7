"""Reading a ``<name>-state/`` folder back for ``network_resume`` (see trainstate.py).

Everything is checked before the data is prepared, so a state that does not belong to the
resumed file, the network or the optimizer fails in seconds with a ConfigError naming
network_resume and the folder. What needs the prepared data (generators, data position)
is restored after ``mode.prepare``.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .ema import EmaWeights
from .outputs import state_path
from ..config.params import ConfigError
from .state import EMA, FORMAT, INFO, OPTIM, REQUIRED, RNG, WEIGHTS, CountedBatches, rng_holders, sha256

log = logging.getLogger(__name__)

# What a state must share with the job that resumes it.
MATCHED = ("network_type", "network_rank", "network_alpha", "train_optimizer")


def _bad(folder: Path, problem: str) -> ConfigError:
    return ConfigError("network_resume", str(folder), problem)


@dataclass
class ResumeState:
    """A checked state folder, loaded on the CPU."""

    folder: Path
    info: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optim: dict[str, Any]
    rng: dict[str, Any]
    ema: dict[str, torch.Tensor] | None

    @property
    def step(self) -> int:
        return int(self.info["step"])

    def restore_training(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                         scheduler: Any) -> None:
        """Raw weights, optimizer and LR scheduler as they were at the saved step."""
        if len(self.weights) != len(params):
            raise _bad(self.folder, f"holds {len(self.weights)} tensors; this network trains {len(params)}")
        for i, p in enumerate(params):
            saved = self.weights.get(f"param.{i}")
            if saved is None or saved.shape != p.shape:
                shape = None if saved is None else tuple(saved.shape)
                raise _bad(self.folder, f"tensor {i} has shape {shape}; this network's is {tuple(p.shape)}")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(self.weights[f"param.{i}"].to(p.device, p.dtype))
        try:
            optimizer.load_state_dict(self.optim["optimizer"])
            if scheduler is not None and self.optim.get("scheduler") is not None:
                scheduler.load_state_dict(self.optim["scheduler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise _bad(self.folder, f"has an optimizer or scheduler state this job cannot use ({exc})") from exc

    def restore_loop(self, ema: EmaWeights | None, scaler: Any) -> None:
        """EMA shadows and the fp16 gradient scaler."""
        if ema is not None:
            if self.ema is None:
                log.info("%s has no EMA weights: the average starts from the resumed weights", self.folder)
            else:
                try:
                    ema.load_state_dict(self.ema)
                except ValueError as exc:
                    raise _bad(self.folder, str(exc)) from exc
        if scaler is not None and self.optim.get("scaler"):
            scaler.load_state_dict(self.optim["scaler"])

    def restore_data(self, ctx: Any, batches: CountedBatches | None) -> None:
        """After prepare: the data order position, then every generator as it was."""
        position = int(self.info.get("data_position", 0))
        if batches is not None:
            batches.skip(position)
        elif position:
            log.warning("this mode keeps no batch iterator; the data order restarts")
        ctx.generator.set_state(self.rng["generator"])
        torch.set_rng_state(self.rng["torch_cpu"])
        if self.rng.get("torch_device") is not None and ctx.device.type != "cpu":
            module = torch.get_device_module(ctx.device)
            if ctx.device.type == "mps":
                module.set_rng_state(self.rng["torch_device"])
            else:
                module.set_rng_state(self.rng["torch_device"], ctx.device)
        holders = rng_holders(ctx.state)
        for key, value in self.rng.get("holders", {}).items():
            if key in holders:
                holders[key].setstate(value)


def open_resume(network_file: Path, cfg: Any) -> ResumeState | None:
    """The checked state next to ``network_file``; None (weights only, from step 1) without one."""
    folder = state_path(network_file)
    if not folder.exists():
        log.info("network_resume: %s has no %s folder; loading the weights only and training from step 1",
                 network_file, folder.name)
        return None
    if not folder.is_dir():
        raise _bad(folder, "is not a folder")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise _bad(folder, f"is missing {', '.join(missing)}")
    info = _read_info(folder)
    _check_info(folder, info, network_file, cfg)
    try:
        weights = load_file(str(folder / WEIGHTS))
        ema = load_file(str(folder / EMA)) if (folder / EMA).is_file() else None
        optim = torch.load(folder / OPTIM, map_location="cpu", weights_only=True)
        rng = torch.load(folder / RNG, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise _bad(folder, f"has an unreadable file ({exc})") from exc
    log.info("network_resume: continuing from step %d with the state in %s", int(info["step"]), folder)
    return ResumeState(folder, info, weights, optim, rng, ema)


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(folder, f"has an unreadable {INFO} ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("step"), int):
        raise _bad(folder, f"{INFO} is not a training state of format {FORMAT}")
    return info


def _check_info(folder: Path, info: dict[str, Any], network_file: Path, cfg: Any) -> None:
    """The state must belong to this file, this network and this optimizer, and leave steps to train."""
    if info.get("network_sha256") != sha256(network_file):
        raise _bad(folder, f"belongs to another version of {info.get('network_file')}, not to {network_file.name}")
    for key in MATCHED:
        if info.get(key) != getattr(cfg, key):
            raise _bad(folder, f"was saved with {key} {info.get(key)!r}; this job has {getattr(cfg, key)!r}")
    if info["step"] >= cfg.train_iterations:
        raise _bad(folder, f"is at step {info['step']}; "
                           f"train_iterations ({cfg.train_iterations}) leaves nothing to train")
