"""FLUX.1 from the files users have: the CLI trains from a BFL transformer with separate CLIP-L,
T5-XXL and autoencoder files, a diffusers folder loads the same model, and a missing part is
named by the field that would supply it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.config.params import ConfigError
from trainer.families.loading import load_model

from tests.enginekit import make_images, quick_config
from tests.flux_tiny import save_flux_files, save_flux_folder, t5_tokenizer_object, tiny_flux

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux")
    files = save_flux_files(tiny_flux("dev"), folder)
    t5_tokenizer_object().save(str(folder / "tokenizer.json"))  # T5's tokenizer next to the T5 file
    return files


def test_the_cli_trains_flux_from_the_separate_files(flux_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    preset = tmp_path / "job.json"
    preset.write_text(json.dumps(quick_config(make_images(tmp_path / "data"), train_iterations=2,
                                              t5xxl_max_token_length=16, train_snr_gamma=0.0).to_dict()))
    code = main(["--preset", str(preset), "--model", str(flux_files["transformer"]),
                 "--clip-l", str(flux_files["clip_l"]), "--t5xxl", str(flux_files["t5xxl"]),
                 "--ae", str(flux_files["ae"]), "--lora-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in load_file(summary["output"]))


def test_files_and_folder_give_the_same_model(flux_files, tmp_path):
    parts = tiny_flux("dev")
    from_files = load_model(flux_files["transformer"], components={k: flux_files[k] for k in ("clip_l", "t5xxl", "ae")},
                            dtype=torch.float32, device=CPU)
    from_folder = load_model(save_flux_folder(parts, tmp_path / "folder"), dtype=torch.float32, device=CPU)
    assert from_files.family.name == from_folder.family.name == "flux"
    for a, b in ((from_files.unet, from_folder.unet), (from_files.vae, from_folder.vae),
                 (from_files.text_encoders[1], from_folder.text_encoders[1])):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    prompt = "a photo of a cat"
    ids = [tok(prompt, padding="max_length", max_length=16, truncation=True).input_ids for tok in
           (from_files.tokenizers[1], from_folder.tokenizers[1])]
    assert ids[0] == ids[1]


def test_a_missing_part_is_named_by_its_field(flux_files):
    with pytest.raises(ConfigError) as info:
        load_model(flux_files["transformer"], components={"clip_l": flux_files["clip_l"], "ae": flux_files["ae"]},
                   dtype=torch.float32, device=CPU)
    assert info.value.key == "t5xxl" and "choose the t5xxl file" in str(info.value)
