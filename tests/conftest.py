"""Test session set-up: the repository's `trainer` first on sys.path, no downloads, sane threads."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The checkout under test must win over any other `trainer` on the path.
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))

# Before transformers/diffusers/huggingface_hub are imported: any attempt to reach a hub fails fast.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# OpenMP threads that spin while waiting collapse (10-100x slower) when the cores are shared
# with another process; sleeping waiters cost little. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cpu_count() -> int:
    """CPUs this process may use (the affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# torch picks its thread count from physical cores, which on small virtual machines can be
# fewer than the CPUs granted; the profiles without torch (none today) simply skip this.
if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(_cpu_count())
