"""Test session set-up: the repository's `trainer` first on sys.path, no downloads, sane threads."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The checkout under test must win over any other `trainer` on the path.
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))

# Before transformers/diffusers/huggingface_hub are imported: any attempt to reach a hub fails fast.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite runs one test process per core next to others on shared CPUs: OpenMP waiters
# that spin would steal cores from the other processes. This is the tests' setting (the
# CLI, the app and the WebUI job keep PyTorch's own default); child processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The UI tests need gradio; the profile without a WebUI has none, so they are not even collected
# there (the `ui` marker deselects them too, but collection would import gradio first).
collect_ignore_glob = [] if importlib.util.find_spec("gradio") else ["test_ui*.py", "uikit.py", "test_api.py"]

# One torch thread per test process: the tiny models' ops are so small that two threads
# spend more time waiting on each other than working (measured 5 s vs 5.5 s, and 22 s when
# the waiters sleep), and pytest-xdist runs one such process per core instead.
# TRAINDECK_TEST_THREADS overrides it.
if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(int(os.environ.get("TRAINDECK_TEST_THREADS", "1")))


@pytest.fixture()
def logs(tmp_path, monkeypatch):
    """CSV logs and settings JSON of a test's jobs go under its tmp_path, not the repository."""
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("TRAINDECK_JSONS", str(tmp_path / "jsons"))
    return tmp_path / "logs"
