"""Preset files: TrainTrain's format loads unchanged; ours round-trip; nothing is overwritten."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config.schema import TrainConfig
from trainer.config.params import ConfigError
from trainer.config.presets import list_presets, load_preset, save_preset, save_run_settings

REPO = Path(__file__).resolve().parent.parent

# Written the way TrainTrain writes its presets: string numbers, "" for defaults,
# lower-case optimizer names, "None" for no VAE, the block list, CRLF endings.
TRAINTRAIN_LORA = {
    "network_type": "lierla", "network_rank": "16", "network_alpha": "8", "lora_data_directory": "",
    "lora_trigger_word": "", "image_size(height, width)": "512", "train_iterations": "1000",
    "train_batch_size": "2", "train_learning_rate": "1e-4", "train_optimizer": "adamw",
    "train_lr_scheduler": "cosine", "save_lora_name": "LoRA", "use_gradient_checkpointing": False,
    "network_blocks(BASE = TextEncoder)": ["BASE", "IN00", "IN01", "M00", "OUT11"],
    "network_conv_rank": "0", "network_conv_alpha": "0", "network_element": "Full",
    "image_buckets_step": "256", "image_min_length": "512", "image_max_ratio": "2", "sub_image_num": "0",
    "image_mirroring": False, "train_fixed_timsteps_in_batch": False, "train_textencoder_learning_rate": "",
    "train_seed": "-1", "train_lr_step_rules": "", "train_lr_warmup_steps": "0",
    "train_lr_scheduler_num_cycles": "1", "train_lr_scheduler_power": "1.0", "train_snr_gamma": "5",
    "save_per_steps": "0", "train_model_precision": "fp16", "train_lora_precision": "fp32",
    "save_precision": "fp16", "diff_load_1st_pass": "", "diff_save_1st_pass": False,
    "diff_1st_pass_only": False, "logging_save_csv": "", "logging_verbose": False, "save_overwrite": False,
    "save_as_json": False, "model_v_pred": False, "use_2nd_pass_settings": False, "mode": "LoRA",
    "model": "", "vae": "None", "original prompt": "", "target prompt": "",
}

# The newer ADDifT layout: CAME, cosine_annealing with settings, extra keys.
TRAINTRAIN_ADDIFT = dict(TRAINTRAIN_LORA, **{
    "mode": "ADDifT", "network_rank": "4", "network_alpha": "1", "diff_target_name": "",
    "train_optimizer": "CAME", "train_optimizer_settings": "", "train_lr_scheduler": "cosine_annealing",
    "train_lr_scheduler_settings": "eta_min=0.00001", "network_resume": "", "network_strength": "2.0",
    "network_train_text_encoder": False, "image_num_multiply": "1", "image_use_filename_as_tag": False,
    "image_disable_upscale": False, "train_min_timesteps": "200", "train_max_timesteps": "400",
    "train_loss_function": "MSE", "train_snr_gamma": "1.0", "diff_alt_ratio": "1.0",
    "diff_revert_original_target": True, "diff_use_diff_mask": False, "logging_save_csv": False,
    "train_VAE_precision": "fp32", "save_as_json": True, "negative prompt": "",
})


def write_crlf(path: Path, data: dict) -> Path:
    path.write_bytes(json.dumps(data, indent=4).replace("\n", "\r\n").encode("utf-8"))
    return path


def test_traintrain_lora_preset_loads_unchanged(tmp_path):
    notes: list[str] = []
    cfg = load_preset(write_crlf(tmp_path / "LoRA.json", TRAINTRAIN_LORA), warnings=notes)
    assert notes == []
    assert (cfg.network_rank, cfg.network_alpha, cfg.train_learning_rate) == (16, 8.0, 1e-4)
    assert cfg.train_optimizer == "AdamW" and cfg.vae == "" and cfg.train_seed == -1
    assert cfg.network_blocks == ["BASE", "IN00", "IN01", "M00", "OUT11"]
    assert cfg.train_textencoder_learning_rate is None and cfg.logging_save_csv is True


def test_traintrain_addift_preset_loads_unchanged(tmp_path):
    notes: list[str] = []
    cfg = load_preset(write_crlf(tmp_path / "ADDifT.json", TRAINTRAIN_ADDIFT), warnings=notes)
    assert notes == []
    assert (cfg.mode, cfg.train_optimizer, cfg.train_lr_scheduler) == ("ADDifT", "CAME", "cosine_annealing")
    assert cfg.train_lr_scheduler_settings == "eta_min=0.00001" and cfg.network_strength == 2.0
    assert (cfg.train_min_timesteps, cfg.train_max_timesteps) == (200, 400)
    assert cfg.diff_revert_original_target is True and cfg.logging_save_csv is False


def test_traintrain_difference_2nd_pass_loads(tmp_path):
    data = dict(TRAINTRAIN_LORA, mode="Difference", use_2nd_pass_settings=True)
    data["2nd pass"] = dict(TRAINTRAIN_LORA, network_rank="4", network_alpha="4", save_lora_name="",
                            train_learning_rate="1e-4")
    cfg = load_preset(write_crlf(tmp_path / "D.json", data))
    assert cfg.for_pass(2).network_rank == 4 and cfg.for_pass(1).network_rank == 16


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"network_rank": "4"}).encode())
    assert load_preset(path).network_rank == 4


@pytest.mark.parametrize("content,fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_broken_files_give_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_missing_preset_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_preset("nope", folder=tmp_path)


def test_shipped_presets_load_validate_and_match_their_names():
    names = list_presets(REPO / "presets")
    assert {"LoRA", "iLECO", "Difference", "Difference_Use2ndPass"} <= set(names)
    for name in names:
        notes: list[str] = []
        cfg = load_preset(name, folder=REPO / "presets", warnings=notes)
        assert notes == [], name
        cfg.validate()
        assert cfg.mode in name or name.startswith(cfg.mode)
    both = load_preset("Difference_Use2ndPass", folder=REPO / "presets")
    assert both.use_2nd_pass_settings and both.for_pass(2).network_rank < both.for_pass(1).network_rank


def test_save_preset_round_trips_and_never_overwrites(tmp_path):
    cfg = TrainConfig(save_lora_name="mine", network_rank=8, image_size=[512, 768], train_textencoder_learning_rate=None)
    path = save_preset(cfg, "mine", tmp_path)
    assert load_preset("mine", folder=tmp_path) == cfg
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        save_preset(TrainConfig(network_rank=2), "mine", tmp_path)
    assert path.read_bytes() == before
    save_preset(TrainConfig(network_rank=2), "mine", tmp_path, overwrite=True)
    assert load_preset("mine", folder=tmp_path).network_rank == 2


@pytest.mark.parametrize("name", ["../escape", "a/b", "/tmp/x"])
def test_preset_names_cannot_escape_the_folder(tmp_path, name):
    with pytest.raises(ConfigError):
        save_preset(TrainConfig(), name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_run_settings_record_the_drawn_seed_and_never_clash(tmp_path):
    cfg = TrainConfig(save_lora_name="run", train_seed=-1)
    a = save_run_settings(cfg, 1234, 1_700_000_000.0, tmp_path)
    b = save_run_settings(cfg, 99, 1_700_000_000.0, tmp_path)
    assert a != b
    assert json.loads(a.read_text())["train_seed"] == 1234
    assert json.loads(b.read_text())["train_seed"] == 99
