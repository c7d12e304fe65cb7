"""--set KEY=VALUE for every preset key, including keys and values that hold '='."""
from __future__ import annotations

import pytest

from trainer.cli import parse_sets, split_set
from trainer.config.schema import TrainConfig
from trainer.config.params import ConfigError

KEYS = sorted({p.key for _, p in TrainConfig.params()} | {name for name, _ in TrainConfig.params()})


def test_some_preset_keys_hold_an_equals_sign() -> None:
    assert "network_blocks(BASE = TextEncoder)" in KEYS


@pytest.mark.parametrize("key", KEYS)
def test_every_preset_key_and_field_name_is_accepted(key: str) -> None:
    assert parse_sets([f"{key}=v=1"]) == ({key: "v=1"}, {})
    assert parse_sets([f"2nd pass.{key}=2"]) == ({}, {key: "2"})
    assert parse_sets([f'"{key}"=x']) == ({key: "x"}, {})


@pytest.mark.parametrize("item,key,value", [
    ("network_blocks(BASE = TextEncoder)=IN01,IN02", "network_blocks(BASE = TextEncoder)", "IN01,IN02"),
    ("train_optimizer_settings=weight_decay=0.01", "train_optimizer_settings", "weight_decay=0.01"),
    ("sample_prompts=a=b=c", "sample_prompts", "a=b=c"),
    ("train_iterations=", "train_iterations", ""),
    ("'network_blocks(BASE = TextEncoder)' = BASE", "network_blocks(BASE = TextEncoder)", " BASE"),
])
def test_split(item: str, key: str, value: str) -> None:
    assert split_set(item) == (key, value)


def test_the_blocks_key_reaches_the_config() -> None:
    over, _ = parse_sets(["network_blocks(BASE = TextEncoder)=IN01,OUT03"])
    assert TrainConfig().with_overrides(over).network_blocks == ["IN01", "OUT03"]


@pytest.mark.parametrize("item,problem", [
    ("novalue", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"), ('"unclosed=3', '"KEY"=VALUE'),
    ("no_such=1", "unknown setting 'no_such'"), ("no(such = key)=1", "unknown setting 'no(such'"),
])
def test_bad_items_name_the_item(item: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_sets([item])
    assert err.value.key == "--set" and problem in str(err.value)
