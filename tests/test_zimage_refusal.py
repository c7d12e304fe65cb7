"""Where the installed diffusers has no Z-Image (the WebUI hosts pin 0.31), a Z-Image model is told
from its keys and refused with the versions; the family is offered only where it can load. Runs in
every profile."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.config.params import ConfigError
from trainer.families import family_names
from trainer.families import zimage_load
from trainer.families.loading import load_model
from trainer.families.zimage_keys import ORIGINAL_MARKERS


def zimage_header(path):
    """A file with a Z-Image transformer's original keys (tiny tensors: only the names matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"model.diffusion_model.{k}": torch.zeros(2) for k in ORIGINAL_MARKERS}, str(path))
    return path


def test_the_family_is_offered_where_diffusers_has_it():
    import diffusers
    from packaging.version import Version

    has = Version(diffusers.__version__).release >= (0, 36)
    assert zimage_load.has_zimage() is has
    assert ("zimage" in family_names()) is has


def test_a_zimage_model_is_refused_with_the_versions_where_diffusers_lacks_it(tmp_path, monkeypatch):
    import diffusers

    model = zimage_header(tmp_path / "z_image_turbo_bf16.safetensors")
    assert zimage_load.is_zimage_model(model)
    monkeypatch.setattr(zimage_load, "has_zimage", lambda: False)
    with pytest.raises(ConfigError) as info:
        load_model(model, vae=tmp_path / "ae.safetensors", components={"qwen3": str(tmp_path / "q.safetensors")})
    assert info.value.key == "model"
    message = str(info.value)
    assert "Z-Image" in message and "diffusers >= 0.36" in message and f"diffusers {diffusers.__version__}" in message


def test_a_zimage_folder_is_refused_the_same_way(tmp_path, monkeypatch):
    folder = tmp_path / "Z-Image-Turbo"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    monkeypatch.setattr(zimage_load, "has_zimage", lambda: False)
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    assert info.value.key == "model" and "diffusers >= 0.36" in str(info.value)


def test_lumina2_and_other_files_are_not_taken_for_zimage(tmp_path):
    lumina = tmp_path / "lumina.safetensors"
    save_file({f"model.diffusion_model.{k.replace('adaLN_modulation.0', 'adaLN_modulation.1')}": torch.zeros(2)
               for k in ORIGINAL_MARKERS}, str(lumina))
    assert not zimage_load.is_zimage_model(lumina)
    assert not zimage_load.is_zimage_model(tmp_path / "missing.safetensors")
