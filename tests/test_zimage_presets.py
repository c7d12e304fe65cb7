"""The Z-Image preset: it loads with Z-Image's own schedule (shift 3.0, as its scheduler config) and the
raw velocity, the family takes it without a message, it round-trips, and it trains a tiny Z-Image."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config.presets import load_preset, save_preset

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def _load():
    notes: list[str] = []
    return load_preset("LoRA_ZImage", folder=PRESETS, warnings=notes), notes


def test_the_preset_holds_zimages_schedule():
    from trainer.families.zimage_load import SCHEDULER

    cfg, notes = _load()
    assert notes == []
    cfg.validate()
    assert (cfg.mode, cfg.save_lora_name, cfg.network_type) == ("LoRA", "LoRA_ZImage", "lierla")
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift) == ("shift", SCHEDULER["shift"])
    assert cfg.model_prediction_type == "raw" and cfg.qwen3_max_token_length == 512 and cfg.qwen3 == ""
    assert "BASE" not in cfg.network_blocks and not cfg.trains_text_encoder and cfg.train_snr_gamma == 0.0


def test_the_preset_round_trips(tmp_path):
    cfg, _ = _load()
    save_preset(cfg, "LoRA_ZImage", tmp_path)
    notes: list[str] = []
    assert load_preset("LoRA_ZImage", folder=tmp_path, warnings=notes) == cfg and notes == []
    shipped = json.loads((PRESETS / "LoRA_ZImage.json").read_text(encoding="utf-8"))
    written = json.loads((tmp_path / "LoRA_ZImage.json").read_text(encoding="utf-8"))
    assert {k: written[k] for k in shipped} == shipped


@pytest.mark.needs_zimage
def test_the_preset_trains_a_tiny_zimage(tmp_path, logs):
    from safetensors import safe_open

    from trainer.families import get_family
    from trainer.training.engine import Trainer

    from tests.enginekit import MemoryHost
    from tests.modekit import write_pair
    from tests.zimage_tiny import tiny_zimage_bundle

    cfg, _ = _load()
    assert get_family("zimage").check(cfg) == []  # nothing refused, nothing left out
    write_pair(tmp_path / "pair", target_suffix="_t")
    cfg = cfg.with_overrides({
        "image_size(height, width)": "64", "image_min_length": 64, "train_iterations": 2, "train_seed": 7,
        "train_optimizer": "AdamW", "train_model_precision": "fp32", "train_VAE_precision": "fp32",
        "save_precision": "fp32", "qwen3_max_token_length": 24, "lora_data_directory": str(tmp_path / "pair")})
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_zimage_bundle()), device="cpu").run()
    assert result.status == "done" and result.steps == 2 and result.output.name == "LoRA_ZImage.safetensors"
    with safe_open(str(result.output), "pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_model_prediction_type"]) == (
        "shift", "3.0", "raw")
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
