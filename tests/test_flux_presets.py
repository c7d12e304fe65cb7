"""The FLUX.1 presets: they load through the preset loader with sd-scripts' recommended FLUX.1 dev
settings, the FLUX family accepts them without a message, and they round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config.presets import load_preset, save_preset
from trainer.config.schema import TrainConfig
from trainer.families import flow, get_family

PRESETS = Path(__file__).resolve().parent.parent / "presets"
FLUX_PRESETS = {"LoRA_FLUX_dev": "LoRA", "iLECO_FLUX": "iLECO", "ADDifT_FLUX": "ADDifT"}

# sd-scripts' docs/flux_train_network.md: the FLUX.1 dev LoRA settings it recommends.
RECOMMENDED = {
    "guidance_scale": 1.0, "timestep_sampling": "flux_shift", "sigmoid_scale": 1.0,
    "model_prediction_type": "raw", "t5xxl_max_token_length": 512, "apply_t5_attn_mask": False,
    "train_optimizer": "AdamW8bit", "train_snr_gamma": 0.0, "train_model_precision": "bf16",
    "train_lora_precision": "fp32", "save_precision": "bf16", "use_gradient_checkpointing": True,
    "image_size": [1024, 1024], "model_v_pred": False,
}


def _load(name: str) -> tuple[TrainConfig, list[str]]:
    notes: list[str] = []
    return load_preset(name, folder=PRESETS, warnings=notes), notes


@pytest.mark.parametrize("name,mode", FLUX_PRESETS.items())
def test_flux_presets_hold_the_recommended_settings(name, mode):
    cfg, notes = _load(name)
    assert notes == []
    cfg.validate()
    assert cfg.mode == mode and cfg.save_lora_name == name
    assert {k: getattr(cfg, k) for k in RECOMMENDED} == RECOMMENDED
    assert 1e-4 <= cfg.train_learning_rate <= 2e-4
    assert "BASE" not in cfg.network_blocks and not cfg.trains_text_encoder  # the transformer only
    assert (cfg.clip_l, cfg.t5xxl, cfg.ae) == ("", "", "")  # the user's own files
    # The FLUX family takes them as they are: nothing refused, no setting left out with a message.
    assert get_family("flux").check(cfg) == []


def test_lora_flux_dev_is_sd_scripts_example_network():
    cfg, _ = _load("LoRA_FLUX_dev")
    assert (cfg.network_type, cfg.network_rank, cfg.network_alpha) == ("lierla", 16, 1.0)
    assert (cfg.train_learning_rate, cfg.train_lr_scheduler, cfg.train_batch_size) == (1e-4, "constant", 1)


@pytest.mark.parametrize("name", FLUX_PRESETS)
def test_flux_presets_round_trip(name, tmp_path):
    cfg, _ = _load(name)
    save_preset(cfg, name, tmp_path)
    notes: list[str] = []
    assert load_preset(name, folder=tmp_path, warnings=notes) == cfg and notes == []
    shipped = json.loads((PRESETS / f"{name}.json").read_text(encoding="utf-8"))
    written = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
    assert {k: written[k] for k in shipped} == shipped  # every key the file holds comes back unchanged


def test_flux_shift_at_1024_is_the_documented_shift_3_1582():
    """Why the presets use flux_shift: at 1024² (4096 image tokens) it is exactly sd-scripts'
    'shift with discrete_flow_shift 3.1582' (e^1.15), and it follows other bucket sizes."""
    cfg, _ = _load("LoRA_FLUX_dev")
    tokens = flow.flux_image_tokens(1024 // 8, 1024 // 8)
    assert tokens == 4096
    drawn = flow.sample_sigmas(flow.FlowOptions(timestep_sampling="flux_shift"), 4096, image_tokens=tokens,
                               generator=torch.Generator().manual_seed(3))
    shifted = flow.sample_sigmas(flow.FlowOptions(timestep_sampling="shift", discrete_flow_shift=cfg.discrete_flow_shift),
                                 4096, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(drawn, shifted, atol=1e-5)
    small = flow.sample_sigmas(flow.FlowOptions(timestep_sampling="flux_shift"), 4096,
                               image_tokens=flow.flux_image_tokens(64, 64), generator=torch.Generator().manual_seed(3))
    assert small.mean() < drawn.mean() - 0.05  # 512²: less shift towards noise


@pytest.mark.parametrize("name", FLUX_PRESETS)
def test_each_flux_preset_trains_a_tiny_flux_with_its_flow_settings(name, tmp_path, logs):
    """The preset as shipped, shrunk only where a CPU and a tiny model need it (size, steps, the
    8-bit optimizer, bf16, T5 length): the job runs and its file records the preset's flow settings."""
    from safetensors import safe_open

    from trainer.training.engine import Trainer

    from tests.enginekit import MemoryHost
    from tests.flux_tiny import tiny_flux_bundle
    from tests.modekit import write_pair

    orig, targ = write_pair(tmp_path / "pair", target_suffix="_t")
    cfg, _ = _load(name)
    cfg = cfg.with_overrides({
        "image_size(height, width)": "64", "image_min_length": 64, "train_iterations": 2, "train_seed": 7,
        "train_optimizer": "AdamW", "train_model_precision": "fp32", "train_VAE_precision": "fp32",
        "save_precision": "fp32", "t5xxl_max_token_length": 16, "lora_data_directory": str(tmp_path / "pair"),
        "original prompt": "a photo of a cat", "target prompt": "a photo of a dog",
        "diff_original_image": str(orig), "diff_target_image": str(targ)})
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle()), device="cpu").run()
    assert result.status == "done" and result.steps == 2 and result.output.name == f"{name}.safetensors"
    with safe_open(str(result.output), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert (meta["ss_timestep_sampling"], meta["ss_model_prediction_type"]) == ("flux_shift", "raw")
    assert float(meta["ss_guidance_scale"]) == 1.0 and meta["modelspec.architecture"].startswith("flux-1-dev")
    assert any(k.startswith("lora_unet_double_blocks_") for k in keys)
    assert not any(k.startswith("lora_te") for k in keys)  # the transformer only, as the presets say
