"""SD3 / SD3.5 from the files users have: a SAI single file with everything, a transformer-only file
with separate clip_l / clip_g / t5xxl / ae files, a file without T5, and a diffusers folder; each
gives the transformer and text encoders of the model it was written from."""
from __future__ import annotations

import pytest
import torch

from trainer.config.params import ConfigError
from trainer.families import file_family
from trainer.families.loading import load_model
from trainer.families.sd3_files import NoT5
from trainer.families.textenc import encode_prompts

from tests.flux_tiny import tiny_t5_tokenizer
from tests.sd3_tiny import save_sd3_components, save_sd3_folder, save_sd3_single, sd3_forward, tiny_sd3_bundle, tiny_sd3_parts

CPU = torch.device("cpu")


def same_model(bundle, variant: str, t5: bool = True) -> None:
    ref = tiny_sd3_bundle(variant, t5=t5)
    assert bundle.family.name == "sd3" and bundle.extra["sd3_variant"] == variant
    assert torch.equal(sd3_forward(bundle.unet), sd3_forward(ref.unet))
    a, b = encode_prompts(bundle, ["a photo of a cat"]), encode_prompts(ref, ["a photo of a cat"])
    assert torch.allclose(a.hidden, b.hidden, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)
    assert bundle.vae_scale == 1.5305 and bundle.vae_shift == 0.0609 and bundle.vae.config.latent_channels == 16


@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
def test_a_single_file_with_everything_loads(tmp_path, variant):
    path = save_sd3_single(tiny_sd3_parts(variant), tmp_path / "sd3.5.safetensors")
    tiny_t5_tokenizer()._tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert file_family(path) == "sd3"
    same_model(load_model(path, dtype=torch.float32, device=CPU), variant)


def test_a_transformer_file_with_separate_component_files_loads(tmp_path):
    parts = tiny_sd3_parts("5-large")
    path = save_sd3_single(parts, tmp_path / "sd3.5_large.safetensors", with_encoders=False)
    files = save_sd3_components(parts, tmp_path / "parts")
    bundle = load_model(path, dtype=torch.float32, device=CPU, components={k: files[k] for k in ("clip_l", "clip_g", "t5xxl")},
                        vae=files["ae"])
    same_model(bundle, "5-large")


def test_without_t5_the_model_trains_on_zero_t5_tokens(tmp_path):
    path = save_sd3_single(tiny_sd3_parts("5-medium", t5=False), tmp_path / "sd3.5_medium.safetensors")
    bundle = load_model(path, dtype=torch.float32, device=CPU)
    assert isinstance(bundle.text_encoders[2], NoT5)
    same_model(bundle, "5-medium", t5=False)


def test_a_missing_part_names_its_field(tmp_path):
    parts = tiny_sd3_parts("5-large")
    path = save_sd3_single(parts, tmp_path / "sd3.5_large.safetensors", with_encoders=False)
    files = save_sd3_components(parts, tmp_path / "parts")
    with pytest.raises(ConfigError) as info:
        load_model(path, dtype=torch.float32, device=CPU, components={"clip_l": files["clip_l"]}, vae=files["ae"])
    assert info.value.key == "clip_g" and "choose the clip_g file" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_model(path, dtype=torch.float32, device=CPU, components={"clip_l": files["t5xxl"]})
    assert info.value.key == "clip_l"


def test_a_diffusers_folder_loads(tmp_path):
    folder = save_sd3_folder(tiny_sd3_parts("5-medium"), tmp_path / "sd3")
    assert file_family(folder) == "sd3"
    same_model(load_model(folder, dtype=torch.float32, device=CPU), "5-medium")
