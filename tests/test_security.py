"""Jobs from the UI and API read models and networks only from the host's folders; names are
normalised (links, `..`) before they are checked; presets and settings files by name only."""
from __future__ import annotations

import pytest

from trainer.hosts.base import StandaloneHost
from trainer.config.params import ConfigError
from trainer.ui.controller import Controller

from tests.enginekit import make_images, quick_config


@pytest.fixture()
def ctl(tmp_path, logs):
    models, lora = tmp_path / "models", tmp_path / "lora"
    models.mkdir()
    lora.mkdir()
    (lora / "sub").mkdir()  # a resume path through it must exist: jobs are checked when they are added
    make_images(tmp_path / "data")
    (models / "sd15.safetensors").write_bytes(b"x")
    (lora / "mine.safetensors").write_bytes(b"x")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    (models / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    c = Controller(StandaloneHost(lora, [models]), tmp_path / "queue.json", uploads=tmp_path / "uploads")
    yield c
    c.close()


@pytest.mark.parametrize("field,value", [
    ("model", "/etc/passwd"),
    ("model", "{tmp}/elsewhere.safetensors"),
    ("model", "{tmp}/models/../elsewhere.safetensors"),
    ("model", "{tmp}/models/link.safetensors"),          # a link out of the model folder
    ("vae", "{tmp}/elsewhere.safetensors"),
    ("network_resume", "/etc/passwd"),
    ("network_resume", "../elsewhere.safetensors"),
    ("network_resume", "{tmp}/elsewhere.safetensors"),
    ("diff_load_1st_pass", "sub/../../elsewhere.safetensors"),
])
def test_paths_outside_the_hosts_folders_are_refused(ctl, tmp_path, field, value):
    value = value.format(tmp=tmp_path)
    cfg = quick_config(tmp_path / "data").with_overrides({field: value})
    with pytest.raises(ConfigError) as info:
        ctl.add(cfg)
    assert info.value.key == field and info.value.value == value
    assert ctl.queue.snapshot() == []


@pytest.mark.parametrize("field,value", [
    ("model", "sd15.safetensors"), ("model", "sd15"), ("model", "{tmp}/models/sd15.safetensors"),
    ("network_resume", "mine.safetensors"), ("network_resume", "{tmp}/lora/mine.safetensors"),
    ("network_resume", "{tmp}/lora/sub/../mine.safetensors"),
])
def test_paths_inside_them_are_admitted(ctl, tmp_path, field, value):
    value = value.format(tmp=tmp_path)
    cfg = quick_config(tmp_path / "data", save_lora_name=f"ok{abs(hash(value))}").with_overrides({field: value})
    assert ctl.add(cfg).startswith("added")


def test_presets_and_settings_load_by_name_only(ctl, tmp_path):
    (tmp_path / "evil.json").write_text("{}")
    with pytest.raises(ConfigError, match="preset"):
        ctl.load_preset(str(tmp_path / "evil.json"))
    with pytest.raises(ConfigError, match="settings"):
        ctl.load_settings(str(tmp_path / "evil.json"))
    with pytest.raises(ConfigError, match="settings"):
        ctl.load_settings("../evil.json")
    assert ctl.load_preset("LoRA")[0].mode == "LoRA"
