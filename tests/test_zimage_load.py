"""Z-Image loads offline from the files users have: ComfyUI's split files (original-layout transformer,
Qwen3 text encoder, FLUX's ae) with Qwen3's tokenizer beside them, and a diffusers folder; what is
missing is named by the field that sets it."""
from __future__ import annotations

import pytest
import torch

from trainer.config.params import ConfigError
from trainer.families.loading import load_model

from tests.zimage_tiny import save_zimage_files, save_zimage_folder, tiny_qwen_tokenizer, tiny_zimage

pytestmark = pytest.mark.needs_zimage
CPU = torch.device("cpu")


def same_model(bundle, parts) -> None:
    """The loaded modules compute what the saved ones do."""
    torch.manual_seed(0)
    frames = [torch.randn(16, 1, 8, 8)]
    caps = [torch.randn(5, 32)]
    t = torch.tensor([0.4])
    with torch.no_grad():
        assert torch.allclose(bundle.unet(frames, t, caps, return_dict=False)[0][0],
                              parts.transformer(frames, t, caps, return_dict=False)[0][0], atol=1e-5)
        ids = torch.tensor([[1, 5, 6, 7, 2]])
        assert torch.allclose(bundle.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2],
                              parts.qwen3(ids, output_hidden_states=True).hidden_states[-2], atol=1e-5)
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.allclose(bundle.vae.encode(image).latent_dist.mean, parts.vae.encode(image).latent_dist.mean, atol=1e-4)
    ours, theirs = bundle.tokenizers[0], tiny_qwen_tokenizer()
    assert ours("a photo of a cat").input_ids == theirs("a photo of a cat").input_ids
    assert ours.chat_template == theirs.chat_template


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_comfyuis_split_files_load(tmp_path, prefix):
    parts = tiny_zimage()
    files = save_zimage_files(parts, tmp_path / "models", prefix=prefix)
    bundle = load_model(files["model"], vae=files["vae"], components={"qwen3": str(files["qwen3"])})
    assert bundle.family.name == "zimage" and bundle.name == "z_image_turbo"
    assert bundle.noise_scheduler.config.shift == 3.0 and not bundle.noise_scheduler.config.use_dynamic_shifting
    same_model(bundle, parts)


def test_a_diffusers_folder_loads(tmp_path):
    parts = tiny_zimage()
    bundle = load_model(save_zimage_folder(parts, tmp_path / "Z-Image-Turbo"))
    assert bundle.family.name == "zimage"
    same_model(bundle, parts)


def test_the_tokenizer_is_found_beside_the_model_too(tmp_path):
    parts = tiny_zimage()
    files = save_zimage_files(parts, tmp_path / "te", tokenizer_dir=None)
    tiny_qwen_tokenizer().save_pretrained(str(files["model"].parent / "tokenizer"))
    bundle = load_model(files["model"], vae=files["vae"], components={"qwen3": str(files["qwen3"])})
    assert bundle.tokenizers[0]("a cat").input_ids == tiny_qwen_tokenizer()("a cat").input_ids


def test_what_is_missing_is_named_by_its_field(tmp_path):
    parts = tiny_zimage()
    files = save_zimage_files(parts, tmp_path / "m", tokenizer_dir=None)
    with pytest.raises(ConfigError) as info:
        load_model(files["model"], vae=files["vae"], components={"qwen3": str(files["qwen3"])})
    assert info.value.key == "qwen3" and "no Qwen3 tokenizer" in str(info.value)
    assert str(files["qwen3"].parent / "qwen3_tokenizer") in str(info.value)  # every place it looked
    with pytest.raises(ConfigError) as info:
        load_model(files["model"], vae=files["vae"])
    assert info.value.key == "qwen3" and "qwen_3_4b" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_model(files["model"], components={"qwen3": str(files["qwen3"])})
    assert info.value.key == "vae" and "ae.safetensors" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_model(files["model"], vae=files["vae"], components={"qwen3": str(files["vae"])})
    assert info.value.key == "qwen3" and "no Qwen3 text encoder" in str(info.value)


def test_the_standalone_host_passes_the_qwen3_file(tmp_path):
    from trainer.config.schema import TrainConfig
    from trainer.hosts.base import StandaloneHost

    parts = tiny_zimage()
    files = save_zimage_files(parts, tmp_path / "models")
    host = StandaloneHost(tmp_path / "out", [tmp_path / "models"])
    cfg = TrainConfig(model="z_image_turbo.safetensors", vae="ae.safetensors", qwen3="qwen_3_4b.safetensors")
    bundle = host.load_bundle(cfg, dtype=torch.float32, device=CPU)
    assert bundle.family.name == "zimage" and bundle.extra["components"]["qwen3"] == str(files["qwen3"].resolve())
