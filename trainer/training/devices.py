"""Device and dtype choice. No device name is written out: torch says what it has."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(preference: str | None = None) -> torch.device:
    """The accelerator torch reports (CUDA, XPU, MPS…) or the CPU.

    `preference` may name a torch device (for example "cpu" or "mps") to force one.
    """
    if preference:
        return torch.device(preference)
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return torch.device(accel.current_accelerator())
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """dtype for frozen weights; fp16 on a CPU becomes fp32 (CPU fp16 kernels are slow or missing)."""
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("fp16 is not a CPU training precision; using fp32 on the CPU")
        return torch.float32
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to the model dtype where it differs from fp32, else a no-op context."""
    enabled = dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def empty_cache(device: torch.device) -> None:
    """Return cached accelerator memory (after a job or an OOM, never per step)."""
    if device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "empty_cache"):
            mod.empty_cache()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Global RNG seeded inside (network initialisation draws from it), restored afterwards.

    The host process (a WebUI) keeps its own random state untouched.
    """
    kind = device.type if device.type != "cpu" else None  # None: torch picks (the CPU is always forked)
    devices = [device.index or 0] if kind else []
    with torch.random.fork_rng(devices=devices, device_type=kind):
        torch.manual_seed(int(seed) % 2**63)
        yield
