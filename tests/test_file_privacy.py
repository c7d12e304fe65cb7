"""What a shared LoRA file gives away, and who can read it.

The header holds no absolute path of the trainer's disk (model and data folders are
recorded by name), and a new file gets the mode a plain write would give (0666 less the
umask) whichever safetensors the profile has; a replaced file keeps its mode.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.enginekit import make_images, quick_config
from tests.ldm_export import write_single_file
from tests.tiny import tiny_bundle
from trainer.cli import main
from trainer.config.schema import TrainConfig
from trainer.networks.metadata import SETTINGS_KEY, STRENGTH_KEY, file_name_only, shareable_settings
from trainer.networks.network import Network

PRIVATE = "home-of-alice"  # a folder name that must not reach the file


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.fixture()
def private_job(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    root = tmp_path / PRIVATE
    (root / "models").mkdir(parents=True)
    model = write_single_file(tiny_bundle("sd1"), root / "models" / "tiny-sd1.safetensors")
    data = make_images(root / "my data")
    other = root / "pairs" / "before.png"
    cfg = quick_config(data, train_iterations=2, save_lora_name="shared")
    preset = tmp_path / "job.json"
    settings = cfg.to_dict()
    settings.update({"diff_original_image": str(other), "2nd pass": {"lora_data_directory": str(data)}})
    preset.write_text(json.dumps(settings), encoding="utf-8")
    return preset, model, tmp_path / "out"


def test_no_absolute_path_in_any_metadata_value(private_job, capsys) -> None:
    preset, model, out = private_job
    assert model.is_absolute()
    code = main(["--preset", str(preset), "--model", str(model), "--lora-dir", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = header(out / "shared.safetensors")
    assert len(meta) > 20
    for key, value in meta.items():
        assert PRIVATE not in value and str(out.parent) not in value, f"{key} holds a path: {value[:200]}"
    settings = json.loads(meta[SETTINGS_KEY])
    assert settings["model"] == "tiny-sd1.safetensors"
    assert settings["lora_data_directory"] == "my data"
    assert settings["diff_original_image"] == "before.png"
    assert settings["2nd pass"]["lora_data_directory"] == "my data"
    assert meta["ss_sd_model_name"].startswith("tiny-sd1") and "/" not in meta["ss_sd_model_name"]


@pytest.mark.parametrize("value,name", [
    ("/home/alice/models/m.safetensors", "m.safetensors"),
    ("C:\\Users\\alice\\models\\m.safetensors", "m.safetensors"),
    ("D:/data/set 1/", "set 1"),
    ("sub/m.safetensors [0123abcd]", "m.safetensors [0123abcd]"),
    ("m.safetensors", "m.safetensors"),
    ("", ""),
])
def test_file_name_only(value: str, name: str) -> None:
    assert file_name_only(value) == name


def test_only_path_fields_are_shortened() -> None:
    cfg = TrainConfig(lora_data_directory="/a/b/c", lora_trigger_word="x/y", save_lora_name="n")
    keys = {p.key for _, p in TrainConfig.params() if p.kind == "path"}
    assert {"model", "vae", "lora_data_directory", "network_resume"} <= keys
    out = shareable_settings(cfg.to_dict(), keys)
    assert out["lora_data_directory"] == "c" and out["lora_trigger_word"] == "x/y"


# ---- file modes ------------------------------------------------------------------
def _save(path: Path, overwrite: bool = False) -> Path:
    bundle = tiny_bundle("sd1")
    net = Network.build(bundle, TrainConfig(network_rank=2, network_alpha=1.0, save_lora_name="m"))
    return net.save(path, dtype=torch.float32, metadata={}, overwrite=overwrite)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_new_lora_file_has_the_mode_of_a_plain_write(tmp_path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = _save(tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_replaced_lora_file_keeps_its_mode(tmp_path) -> None:
    path = _save(tmp_path / "kept.safetensors")
    path.chmod(0o640)
    path.write_bytes(b"old")  # so that a rewrite shows
    _save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert header(path)[STRENGTH_KEY] == "1.0"


def test_state_folder_files_have_the_mode_of_a_plain_write(private_job, capsys) -> None:
    preset, model, out = private_job
    old = os.umask(0o022)
    try:
        code = main(["--preset", str(preset), "--model", str(model), "--lora-dir", str(out), "--quiet",
                     "--set", "save_state=true"])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    files = sorted((out / "shared-state").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o644 for f in files}
