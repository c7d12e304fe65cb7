"""Helpers for the UI tests: an app on the demo model, handlers found by api_name."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from trainer.config.schema import SECOND_PASS_FIELDS
from trainer.demo import DEMO_MODEL, ensure_demo
from trainer.hosts.base import StandaloneHost
from trainer.paths import ROOT
from trainer.config.presets import load_preset
from trainer.ui import form
from trainer.ui.app import App
from trainer.ui.controller import Controller


def handler(blocks, api_name: str):
    """The Python function behind an event, as gradio itself would call it (3.x and 4.x)."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    if isinstance(blocks.fns, dict):
        found = [f for f in fns if getattr(f, "api_name", None) == api_name]
    else:
        found = [f for d, f in zip(blocks.dependencies, fns) if d.get("api_name") == api_name]
    assert len(found) == 1, f"{api_name}: {len(found)} handlers"
    return found[0].fn


def make_app(tmp_path: Path, monkeypatch, demo_root: Path) -> App:
    """An app whose folders all live under tmp_path, on the (shared) demo model."""
    presets = tmp_path / "presets"
    shutil.copytree(ROOT / "presets", presets)
    monkeypatch.setenv("TRAINDECK_PRESETS", str(presets))
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("TRAINDECK_JSONS", str(tmp_path / "jsons"))
    models, images = ensure_demo(demo_root)
    host = StandaloneHost(tmp_path / "out", [models])
    fallbacks = {"model": DEMO_MODEL}  # the demo's images are chosen explicitly, in the form
    ctl = Controller(host, tmp_path / "queue.json", fallbacks=fallbacks, device="cpu", uploads=tmp_path / "uploads")
    quick = load_preset("LoRA_Demo").with_overrides({**fallbacks, "lora_data_directory": str(images),
                                                     "train_iterations": 3, "image_size(height, width)": 64,
                                                     "image_min_length": 64})
    return App(ctl, quick)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture()
def app(tmp_path, monkeypatch, demo_root):
    built = make_app(tmp_path, monkeypatch, demo_root)
    yield built
    built.ctl.close()


def values(app: App, **changes) -> list:
    """The form's current widget values (initial values) with `changes` by field name."""
    train = app.train
    out = []
    for name in form.FORM_FIELDS:
        out.append(changes.get(name, train.fields[name].value))
    for name in SECOND_PASS_FIELDS:
        out.append(changes.get(f"2nd_{name}", train.second[name].value))
    return out


def wait_idle(app: App, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not app.ctl.queue.running:
            return app.ctl.status()
        time.sleep(0.05)
    raise TimeoutError(app.ctl.status())
