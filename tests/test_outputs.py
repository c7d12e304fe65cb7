"""Output planning and atomic writes: nothing is overwritten without save_overwrite."""
from __future__ import annotations

import pytest

from trainer.config.schema import TrainConfig
from trainer.fsutil import atomic_path, write_json_atomic
from trainer.training.outputs import plan_outputs, save_steps
from trainer.config.params import ConfigError


def test_save_steps_exclude_the_final_step():
    assert save_steps(10, 0) == []
    assert save_steps(10, 3) == [3, 6, 9]
    assert save_steps(9, 3) == [3, 6]


def test_plan_names_final_and_intermediate_files(tmp_path):
    plan = plan_outputs(TrainConfig(save_lora_name="cat", train_iterations=10, save_per_steps=4), tmp_path)
    assert plan.final == tmp_path / "cat.safetensors"
    assert plan.intermediate == {4: tmp_path / "cat_4steps.safetensors", 8: tmp_path / "cat_8steps.safetensors"}
    assert plan_outputs(TrainConfig(save_lora_name="cat"), tmp_path, "_copy").final.name == "cat_copy.safetensors"


@pytest.mark.parametrize("existing", ["cat.safetensors", "cat_4steps.safetensors"])
def test_plan_refuses_any_existing_output_before_training(tmp_path, existing):
    (tmp_path / existing).write_bytes(b"old")
    cfg = TrainConfig(save_lora_name="cat", train_iterations=10, save_per_steps=4)
    with pytest.raises(ConfigError) as err:
        plan_outputs(cfg, tmp_path)
    assert err.value.key == "save_lora_name" and existing in str(err.value)
    plan_outputs(TrainConfig(save_lora_name="cat", train_iterations=10, save_per_steps=4, save_overwrite=True), tmp_path)
    assert (tmp_path / existing).read_bytes() == b"old"


def test_atomic_path_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "net.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


def test_atomic_path_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(FileExistsError):
        write_json_atomic(target, {"a": 2}, overwrite=False)
    assert target.read_text().strip().endswith("}") and '"a": 1' in target.read_text()
    write_json_atomic(target, {"a": 2})
    assert '"a": 2' in target.read_text()
