"""SD3.5 from the CLI: it trains from a transformer-only SAI file with separate CLIP-L, CLIP-G, T5-XXL
and autoencoder files (--clip-l, --clip-g, --t5xxl, --ae), writing sd-scripts' SAI keys."""
from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import load_file

from trainer.cli import main

from tests.enginekit import make_images, quick_config
from tests.sd3_tiny import save_sd3_components, save_sd3_single, tiny_sd3_parts


def test_the_cli_trains_sd3_from_the_separate_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    parts = tiny_sd3_parts("5-large")
    model = save_sd3_single(parts, tmp_path / "models" / "sd3.5_large.safetensors", with_encoders=False)
    files = save_sd3_components(parts, tmp_path / "models")
    preset = tmp_path / "job.json"
    preset.write_text(json.dumps(quick_config(make_images(tmp_path / "data"), train_iterations=2,
                                              t5xxl_max_token_length=8, train_snr_gamma=0.0).to_dict()))
    code = main(["--preset", str(preset), "--model", str(model), "--clip-l", str(files["clip_l"]),
                 "--clip-g", str(files["clip_g"]), "--t5xxl", str(files["t5xxl"]), "--ae", str(files["ae"]),
                 "--set", "training_shift=3.0", "--lora-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert any(k.startswith("lora_unet_joint_blocks_0_context_block_attn_qkv.") for k in load_file(summary["output"]))
    with safe_open(summary["output"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "5-large" and meta["ss_training_shift"] == "3.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
