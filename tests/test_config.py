"""The parameter schema: coercion, errors that name key and value, round trips."""
from __future__ import annotations

import pytest

from trainer.config.schema import BLOCK_IDS, IGNORED_KEYS, MODES, TrainConfig
from trainer.config.params import ConfigError


def test_every_param_has_label_help_modes_and_a_valid_default():
    names = set()
    for name, p in TrainConfig.params():
        assert p.label and p.help, name
        assert set(p.modes) <= set(MODES) and p.modes, name
        assert p.key not in names
        names.add(p.key)
        if p.kind == "choice":
            assert getattr(TrainConfig(), name) in p.choices, name
    # a default config survives its own coercion unchanged
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.parametrize("key,value,expected", [
    ("network_rank", "16", 16),
    ("network_rank", 32.0, 32),
    ("network_alpha", "0.5", 0.5),
    ("train_learning_rate", "1e-4", 1e-4),
    ("train_optimizer", "adamw", "AdamW"),
    ("train_optimizer", "prodigy", "Prodigy"),
    ("train_lr_scheduler", "COSINE", "cosine"),
    ("train_model_precision", "bfloat16", "bf16"),
    ("network_type", "LoCon", "c3lier"),
    ("image_mirroring", "true", True),
    ("image_mirroring", "", False),
    ("logging_save_csv", "", True),
    ("train_textencoder_learning_rate", "", None),
    ("train_textencoder_learning_rate", "5e-5", 5e-5),
    ("image_size(height, width)", "512", [512, 512]),
    ("image_size(height, width)", "512,768", [512, 768]),
    ("image_size(height, width)", [768, 512], [768, 512]),
    ("network_blocks(BASE = TextEncoder)", ["out01", "BASE", "IN02"], ["BASE", "IN02", "OUT01"]),
    ("original prompt", "a cat", "a cat"),
])
def test_values_coerce_the_way_traintrain_wrote_them(key, value, expected):
    name, _ = TrainConfig.param_for(key)
    assert getattr(TrainConfig.from_dict({key: value}), name) == expected


@pytest.mark.parametrize("key,value,fragment", [
    ("train_batch_size", "abc", "expected a number"),
    ("train_batch_size", 0, "at least 1"),
    ("train_batch_size", 2.5, "whole number"),
    ("network_rank", True, "not true/false"),
    ("train_learning_rate", "nan", "finite"),
    ("train_learning_rate", -1, "at least 0"),
    ("train_optimizer", "sgdx", "expected one of"),
    ("image_size(height, width)", "513", "multiple of 8"),
    ("image_size(height, width)", "512,512,512", "one or two"),
    ("image_size(height, width)", 100000, "at most"),
    ("network_blocks(BASE = TextEncoder)", ["IN99"], "unknown block"),
    ("image_mirroring", "maybe", "true or false"),
    ("save_lora_name", "a\x00b", "NUL"),
    ("save_lora_name", ["x"], "expected text"),
])
def test_bad_values_name_the_key_and_the_value(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({key: value})
    assert err.value.key == key
    assert fragment in str(err.value)
    assert repr(value) in str(err.value) or repr(value[0] if isinstance(value, list) else value) in str(err.value)


def test_unknown_keys_warn_and_known_ignored_keys_do_not():
    notes: list[str] = []
    cfg = TrainConfig.from_dict({"no_such_key": 1, "logging_use_wandb": False, "network_rank": "8"}, warnings=notes)
    assert cfg.network_rank == 8
    assert notes == ["unknown setting 'no_such_key' ignored"]
    assert "logging_use_wandb" in IGNORED_KEYS


def test_not_an_object_is_refused():
    with pytest.raises(ConfigError, match="expected a JSON object"):
        TrainConfig.from_dict(["network_rank", 4])  # type: ignore[arg-type]


def test_vae_none_means_no_vae():
    assert TrainConfig.from_dict({"vae": "None"}).vae == ""


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "CON", "nul.txt", ".hidden", "", "x" * 300])
def test_validate_refuses_unsafe_output_names(name):
    with pytest.raises(ConfigError) as err:
        TrainConfig(save_lora_name=name).validate()
    assert err.value.key == "save_lora_name"


def test_validate_cross_field_checks():
    with pytest.raises(ConfigError, match="train_min_timesteps"):
        TrainConfig(save_lora_name="x", train_min_timesteps=500, train_max_timesteps=400).validate()
    with pytest.raises(ConfigError, match="network_dora"):
        TrainConfig(save_lora_name="x", network_type="loha", network_dora=True).validate()
    with pytest.raises(ConfigError) as err:
        TrainConfig(save_lora_name="x", train_optimizer_settings="weight_decay").validate()
    assert err.value.key == "train_optimizer_settings"
    with pytest.raises(ConfigError) as err:
        TrainConfig(save_lora_name="x", train_lr_step_rules="1:10,abc").validate()
    assert err.value.key == "train_lr_step_rules"
    assert TrainConfig(save_lora_name="ok", train_optimizer_settings="weight_decay=0.01; betas=(0.9,0.99)").validate()


def test_second_pass_overrides_only_pass_two():
    cfg = TrainConfig.from_dict({
        "mode": "Difference", "save_lora_name": "d", "network_rank": "16", "use_2nd_pass_settings": True,
        "2nd pass": {"network_rank": "4", "train_learning_rate": "1e-5", "save_lora_name": "", "model": "other"},
    })
    assert cfg.for_pass(1).network_rank == 16
    second = cfg.for_pass(2)
    assert (second.network_rank, second.train_learning_rate) == (4, 1e-5)
    assert second.save_lora_name == "d" and second.model == ""  # identity stays from pass 1
    assert TrainConfig.from_dict({**cfg.to_dict(), "use_2nd_pass_settings": False}).for_pass(2).network_rank == 16


def test_second_pass_values_are_validated():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"2nd pass": {"network_rank": "zero"}})
    assert err.value.key == "network_rank"


def test_trains_text_encoder_follows_base_rate_and_mode():
    assert TrainConfig(mode="LoRA").trains_text_encoder
    assert not TrainConfig(mode="LoRA", train_textencoder_learning_rate=0.0).trains_text_encoder
    assert not TrainConfig(mode="LoRA", network_blocks=list(BLOCK_IDS[1:])).trains_text_encoder
    assert not TrainConfig(mode="iLECO").trains_text_encoder
    assert TrainConfig(train_learning_rate=1e-4, train_textencoder_learning_rate=None).text_encoder_lr == 1e-4
