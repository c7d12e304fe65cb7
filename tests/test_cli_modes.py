"""Every mode runs from the CLI with its shipped preset and --set overrides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainer.cli import main, parse_sets
from trainer.config.params import ConfigError

from tests.enginekit import make_images
from tests.ldm_export import write_single_file
from tests.modekit import write_pair
from tests.tiny import tiny_bundle

SMALL = ["train_iterations=2", "train_batch_size=1", "image_size(height, width)=64", "image_min_length=64",
         "image_buckets_step=64"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return write_single_file(tiny_bundle("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors")


def run(preset: str, model: Path, out: Path, sets: list[str], capsys) -> dict:
    argv = ["--preset", preset, "--model", str(model), "--lora-dir", str(out), "--quiet", "--device", "cpu"]
    for item in SMALL + sets:
        argv += ["--set", item]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def inputs(tmp_path: Path) -> dict[str, list[str]]:
    orig, targ = write_pair(tmp_path / "pair")
    pairs = tmp_path / "pairs"
    write_pair(pairs, "a", target_suffix="_target")
    write_pair(pairs, "b", target_suffix="_target")
    images = [f"diff_original_image={orig}", f"diff_target_image={targ}"]
    return {
        "LoRA": [f"lora_data_directory={make_images(tmp_path / 'data')}"],
        "iLECO": ["original prompt=a cat", "target prompt="],
        "Difference": images + ["original prompt=face"],
        "Difference_Use2ndPass": images + ["2nd pass.train_iterations=1", "2nd pass.network_rank=2"],
        "ADDifT": images + ["diff_alt_ratio=0.5"],
        "Multi-ADDifT": [f"lora_data_directory={pairs}"],
    }


@pytest.mark.parametrize("preset", ["LoRA", "iLECO", "Difference", "Difference_Use2ndPass", "ADDifT", "Multi-ADDifT"])
def test_each_mode_runs_from_its_preset(preset, tmp_path, model_file, logs, capsys):
    sets = inputs(tmp_path)[preset] + [f"save_lora_name=cli-{preset}"]
    summary = run(preset, model_file, tmp_path / "out", sets, capsys)
    assert summary["status"] == "done" and summary["output"] == str(tmp_path / "out" / f"cli-{preset}.safetensors")
    assert Path(summary["output"]).is_file() and isinstance(summary["loss_last"], float)
    if preset == "Difference_Use2ndPass":
        downs = {v.shape[0] for k, v in load_file(summary["output"]).items() if k.endswith("lora_down.weight")}
        assert summary["steps"] == 1 and downs == {2}  # the second pass's overrides took effect
    else:
        assert summary["steps"] == 2


def test_second_pass_overrides_are_checked():
    assert parse_sets(["2nd pass.network_rank=8", "train_iterations=3"]) == ({"train_iterations": "3"},
                                                                              {"network_rank": "8"})
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        parse_sets(["2nd pass.nope=1"])


def test_a_bad_second_pass_value_names_the_key(tmp_path, model_file, capsys):
    code = main(["--preset", "Difference_Use2ndPass", "--model", str(model_file), "--lora-dir", str(tmp_path),
                 "--set", "2nd pass.network_rank=many", "--quiet"])
    assert code == 2 and "network_rank: expected a number (got 'many')" in capsys.readouterr().err
