"""The SD3.5 presets: they load with sd-scripts' recommended SD3 LoRA settings (docs/sd3_train_network.md),
the SD3 family accepts them without a message, they hold no FLUX-only setting, and they train."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config.presets import load_preset
from trainer.config.schema import TrainConfig
from trainer.families import get_family

PRESETS = Path(__file__).resolve().parent.parent / "presets"
SD3_PRESETS = {"LoRA_SD35": "LoRA", "iLECO_SD35": "iLECO"}
RECOMMENDED = {"weighting_scheme": "uniform", "training_shift": 1.0, "train_optimizer": "AdamW8bit",
               "train_model_precision": "fp16", "use_gradient_checkpointing": True, "t5xxl_max_token_length": 256,
               "train_snr_gamma": 0.0, "model_v_pred": False, "image_size": [1024, 1024]}
FLUX_ONLY = ("guidance_scale", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type")


@pytest.mark.parametrize("name,mode", SD3_PRESETS.items())
def test_sd3_presets_hold_the_recommended_settings(name, mode):
    notes: list[str] = []
    cfg = load_preset(name, folder=PRESETS, warnings=notes)
    assert notes == []
    cfg.validate()
    assert cfg.mode == mode and cfg.save_lora_name == name
    assert {k: getattr(cfg, k) for k in RECOMMENDED} == RECOMMENDED
    text = (PRESETS / f"{name}.json").read_text(encoding="utf-8")
    assert '"clip_g"' in text and not any(f'"{k}"' in text for k in FLUX_ONLY)
    assert get_family("sd3").check(cfg) == []
    if mode == "LoRA":
        assert (cfg.network_rank, cfg.network_alpha, cfg.train_learning_rate) == (16, 1.0, 1e-4)


def test_a_preset_trains_a_tiny_sd3(tmp_path, logs):
    from trainer.training.engine import Trainer

    from tests.enginekit import MemoryHost
    from tests.modekit import write_pair
    from tests.sd3_tiny import tiny_sd3_bundle

    write_pair(tmp_path / "data", target_suffix="_t")
    cfg = load_preset("LoRA_SD35", folder=PRESETS)
    over = dict(lora_data_directory=str(tmp_path / "data"), train_iterations=2, image_size=[64, 64],
                image_min_length=64, train_optimizer="AdamW", train_model_precision="fp32", save_precision="fp32",
                t5xxl_max_token_length=8)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **over})
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle()), device="cpu").run()
    assert result.status == "done" and result.output.is_file()
