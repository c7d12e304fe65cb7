"""save_state / network_resume: an interrupted and resumed run equals an uninterrupted one."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.data.batches import BucketBatches
from trainer.training.engine import Trainer
from trainer.training.events import StopFlag
from trainer.training.outputs import plan_outputs, state_path
from trainer.config.params import ConfigError
from trainer.training.runlog import read_log

from tests.enginekit import MemoryHost, make_images, quick_config

# LoRA mode, AdamW, cosine schedule, batch 2 of 4 images (2 batches an epoch), 8 steps;
# caption dropout and offset noise make the caption RNG and the pass's generator matter.
RUN = dict(train_iterations=8, train_optimizer="AdamW", train_lr_scheduler="cosine", train_batch_size=2,
           caption_dropout_rate=0.3, noise_offset=0.05, save_state=True)


def _run(data: Path, lora: Path, stop_at: int = 0, **over):
    cfg = quick_config(data, **{**RUN, **over})
    stop = StopFlag()

    def listener(p):
        if stop_at and p.phase == "training" and p.step == stop_at:
            stop.request(save=True)

    return Trainer(cfg, MemoryHost(lora), device="cpu", stop=stop, listeners=[listener]).run()


def _same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.allclose(ta[key], tb[key], atol=1e-6, rtol=0), key


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One uninterrupted 8-step run with an intermediate save (and state) at step 4."""
    root = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAINDECK_LOGS", str(root / "logs"))
    mp.setenv("TRAINDECK_JSONS", str(root / "jsons"))
    data = make_images(root / "data", n=4)
    result = _run(data, root / "lora", save_lora_name="full", save_per_steps=4)
    mp.undo()
    assert result.status == "done" and result.steps == 8
    return data, root / "lora"


def test_state_folder_contents(full):
    _, lora = full
    folder = state_path(lora / "full_4steps.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["state.json", "optimizer.pt", "rng.pt", "weights.safetensors"])
    info = json.loads((folder / "state.json").read_text())
    assert info["step"] == 4 and info["data_position"] == 4 and info["network_file"] == "full_4steps.safetensors"
    assert info["train_optimizer"] == "AdamW" and info["network_rank"] == 4
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    assert all(s["step"] == 4 for s in optim["optimizer"]["state"].values())
    assert optim["scheduler"]["last_epoch"] == 4
    assert not any(p.name.startswith(".") for p in lora.iterdir())  # no temp folder left


def test_resume_from_an_intermediate_save_matches_the_uninterrupted_run(full, tmp_path, logs, caplog):
    data, lora = full
    with caplog.at_level(logging.INFO, logger="trainer.training.resume"):
        result = _run(data, tmp_path / "lora", save_lora_name="resumed",
                      network_resume=str(lora / "full_4steps.safetensors"))
    assert result.status == "done" and result.steps == 8
    assert "continuing from step 4" in caplog.text
    _same(tmp_path / "lora" / "resumed.safetensors", lora / "full.safetensors")
    header, frame = read_log(result.logs[0])
    assert header["resumed_from_step"] == "4" and list(frame["Step"]) == [5, 6, 7, 8]


def test_stop_and_save_then_resume_matches_with_ema(tmp_path, logs):
    data = make_images(tmp_path / "data", n=4)
    whole = _run(data, tmp_path / "a", save_lora_name="whole", ema_decay=0.9)
    stopped = _run(data, tmp_path / "b", stop_at=4, save_lora_name="part", ema_decay=0.9)
    assert stopped.status == "stopped" and stopped.steps == 4
    assert (tmp_path / "b" / "part-state" / "ema.safetensors").is_file()
    resumed = _run(data, tmp_path / "b", save_lora_name="rest", ema_decay=0.9,
                   network_resume=str(tmp_path / "b" / "part.safetensors"))
    assert whole.status == resumed.status == "done"
    _same(tmp_path / "b" / "rest.safetensors", tmp_path / "a" / "whole.safetensors")  # EMA weights
    _same(tmp_path / "b" / "rest-state" / "weights.safetensors", tmp_path / "a" / "whole-state" / "weights.safetensors")
    _same(tmp_path / "b" / "rest-state" / "ema.safetensors", tmp_path / "a" / "whole-state" / "ema.safetensors")


def test_without_a_state_folder_only_the_weights_resume(full, tmp_path, logs, caplog):
    data, lora = full
    shutil.copy(lora / "full_4steps.safetensors", tmp_path / "bare.safetensors")
    with caplog.at_level(logging.INFO, logger="trainer.training.resume"):
        result = _run(data, tmp_path / "lora", save_lora_name="bare", network_resume=str(tmp_path / "bare.safetensors"))
    assert "loading the weights only and training from step 1" in caplog.text
    header, frame = read_log(result.logs[0])
    assert "resumed_from_step" not in header and list(frame["Step"]) == list(range(1, 9))
    final = load_file(str(tmp_path / "lora" / "bare.safetensors"))
    full_final = load_file(str(lora / "full.safetensors"))
    assert any(not torch.allclose(final[k], full_final[k], atol=1e-6) for k in final)


def _copy_pair(lora: Path, dest: Path, name: str = "full_4steps") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(lora / f"{name}.safetensors", dest / f"{name}.safetensors")
    shutil.copytree(state_path(lora / f"{name}.safetensors"), state_path(dest / f"{name}.safetensors"))
    return dest / f"{name}.safetensors"


def _refused(data: Path, tmp_path: Path, resume: Path, match: str, **over) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as err:
        _run(data, tmp_path / "out", save_lora_name="x", network_resume=str(resume), **over)
    assert err.value.key == "network_resume" and err.value.value == str(state_path(resume))
    assert not (tmp_path / "out" / "x.safetensors").exists()
    return err.value


def test_a_state_of_another_optimizer_is_refused(full, tmp_path, logs):
    data, lora = full
    _refused(data, tmp_path, _copy_pair(lora, tmp_path / "in"), "train_optimizer 'AdamW'", train_optimizer="Adam")


@pytest.mark.parametrize("key, value", [("network_type", "LoHa"), ("network_rank", 8)])
def test_a_state_of_another_network_is_refused(full, tmp_path, logs, key, value):
    data, lora = full
    resume = _copy_pair(lora, tmp_path / "in")
    info_path = state_path(resume) / "state.json"
    info = json.loads(info_path.read_text())
    info[key] = value  # a state written for another network, beside this network's file
    info_path.write_text(json.dumps(info), encoding="utf-8")
    _refused(data, tmp_path, resume, f"was saved with {key} {value!r}")


def test_a_state_with_a_missing_file_is_refused(full, tmp_path, logs):
    data, lora = full
    resume = _copy_pair(lora, tmp_path / "in")
    (state_path(resume) / "optimizer.pt").unlink()
    _refused(data, tmp_path, resume, "is missing optimizer.pt")


def test_a_state_next_to_another_file_is_refused(full, tmp_path, logs):
    data, lora = full
    resume = _copy_pair(lora, tmp_path / "in")
    shutil.copy(lora / "full.safetensors", resume)  # the final weights beside the step-4 state
    _refused(data, tmp_path, resume, "belongs to another version of full_4steps.safetensors")


def test_a_state_at_the_last_step_is_refused(full, tmp_path, logs):
    data, lora = full
    _refused(data, tmp_path, _copy_pair(lora, tmp_path / "in"), "leaves nothing to train", train_iterations=4)


def test_a_corrupt_state_json_is_refused(full, tmp_path, logs):
    data, lora = full
    resume = _copy_pair(lora, tmp_path / "in")
    (state_path(resume) / "state.json").write_text("{not json", encoding="utf-8")
    _refused(data, tmp_path, resume, "unreadable state.json")


def test_state_folders_are_never_overwritten_without_save_overwrite(full, tmp_path):
    data, _ = full
    (tmp_path / "taken-state").mkdir()
    cfg = quick_config(data, **{**RUN, "save_lora_name": "taken"})
    with pytest.raises(ConfigError, match="taken-state already exists") as err:
        plan_outputs(cfg, tmp_path)
    assert err.value.key == "save_lora_name"
    plan_outputs(quick_config(data, **{**RUN, "save_lora_name": "taken", "save_state": False}), tmp_path)
    plan_outputs(quick_config(data, **{**RUN, "save_lora_name": "taken", "save_overwrite": True}), tmp_path)


def test_overwriting_replaces_the_state_folder_whole(full, tmp_path, logs):
    data, lora = full
    resume = _copy_pair(lora, tmp_path / "lora", "full")
    (state_path(resume) / "stale.txt").write_text("old", encoding="utf-8")
    result = _run(data, tmp_path / "lora", save_lora_name="full", save_overwrite=True, train_iterations=2)
    assert result.status == "done"
    folder = state_path(resume)
    assert not (folder / "stale.txt").exists() and json.loads((folder / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["full-state", "full.safetensors"]


def test_skip_gives_the_batches_next_would_have():
    from tests.test_batches import COUNTS, _dataset, _ids

    data = _dataset(COUNTS)
    walked = iter(BucketBatches(data, batch_size=2, seed=3))
    order = [_ids(next(walked)) for _ in range(20)]
    for k in (0, 1, 6, 13):
        skipped = iter(BucketBatches(data, batch_size=2, seed=3))
        skipped.skip(k)
        assert skipped.position == k
        assert [_ids(next(skipped)) for _ in range(20 - k)] == order[k:]
    with pytest.raises(ValueError):
        skipped.skip(-1)



def test_multi_addift_resumes_exactly_through_its_pair_batches(tmp_path, logs):
    """Multi-ADDifT's batch iterator cannot skip: the runner draws again the batches already used."""
    from PIL import Image

    from tests.modekit import mode_job, pattern

    data = tmp_path / "pairs"
    data.mkdir()
    for i in range(3):  # distinct pairs, one per batch: the order matters
        Image.fromarray(pattern(shift=70 * i)).save(data / f"p{i}.png")
        Image.fromarray(pattern(shift=70 * i, patch=True)).save(data / f"p{i}_t.png")
    job = dict(lora_data_directory=str(data), diff_target_name="_t", train_iterations=6, train_batch_size=1,
               train_lr_scheduler="cosine", save_state=True)
    lora = tmp_path / "lora"
    whole = Trainer(mode_job(tmp_path, "Multi-ADDifT", save_lora_name="whole", save_per_steps=3, **job),
                    MemoryHost(lora), device="cpu").run()
    resumed = Trainer(mode_job(tmp_path, "Multi-ADDifT", save_lora_name="rest",
                               network_resume=str(lora / "whole_3steps.safetensors"), **job),
                      MemoryHost(lora), device="cpu").run()
    assert whole.status == resumed.status == "done" and resumed.steps == 6
    assert json.loads((lora / "whole_3steps-state" / "state.json").read_text())["data_position"] == 3
    _same(lora / "rest.safetensors", lora / "whole.safetensors")


def test_a_schedule_free_optimizer_resumes_exactly(tmp_path, logs):
    """Its file holds the averaged (eval) weights; the state keeps the training point and z."""
    data = make_images(tmp_path / "data", n=4)
    over = dict(train_optimizer="AdamWScheduleFree", train_lr_scheduler="constant", train_iterations=6)
    lora = tmp_path / "lora"
    _run(data, lora, save_lora_name="whole", save_per_steps=3, **over)
    _run(data, lora, save_lora_name="rest", network_resume=str(lora / "whole_3steps.safetensors"), **over)
    _same(lora / "rest.safetensors", lora / "whole.safetensors")
    _same(lora / "rest-state" / "weights.safetensors", lora / "whole-state" / "weights.safetensors")


def test_resuming_under_the_same_name_plans_only_the_steps_left(full, tmp_path, logs):
    """A job stopped at step 5 resumes from its step-4 save, same name, without save_overwrite."""
    data, lora = full
    out = tmp_path / "lora"
    stop = StopFlag()
    cfg = quick_config(data, **{**RUN, "save_lora_name": "job", "save_per_steps": 2})

    def listener(p):
        if p.phase == "training" and p.step == 5:
            stop.request(save=False)

    first = Trainer(cfg, MemoryHost(out), device="cpu", stop=stop, listeners=[listener]).run()
    assert first.status == "stopped"
    assert [p.name for p in first.saved] == ["job_2steps.safetensors", "job_4steps.safetensors"]
    again = cfg.with_overrides({"network_resume": str(out / "job_4steps.safetensors")})
    assert sorted(plan_outputs(again, out).intermediate) == [6]
    result = Trainer(again, MemoryHost(out), device="cpu").run()
    assert [p.name for p in result.saved] == ["job_6steps.safetensors", "job.safetensors"]
    _same(out / "job.safetensors", lora / "full.safetensors")


def test_ileco_resumes_exactly_without_a_data_order(tmp_path, logs):
    """iLECO keeps no batches: the generator, weights and optimizer carry the run on."""
    from tests.modekit import mode_job

    job = dict(original_prompt="a cat", target_prompt="", train_iterations=6, train_lr_scheduler="cosine",
               save_state=True)
    lora = tmp_path / "lora"
    Trainer(mode_job(tmp_path, "iLECO", save_lora_name="whole", save_per_steps=3, **job), MemoryHost(lora),
            device="cpu").run()
    assert json.loads((lora / "whole_3steps-state" / "state.json").read_text())["data_position"] == 0
    Trainer(mode_job(tmp_path, "iLECO", save_lora_name="rest", network_resume=str(lora / "whole_3steps.safetensors"),
                     **job), MemoryHost(lora), device="cpu").run()
    _same(lora / "rest.safetensors", lora / "whole.safetensors")


def test_a_failed_state_write_keeps_the_old_folder(full, tmp_path, logs, monkeypatch):
    import trainer.training.state as trainstate

    data, lora = full
    resume = _copy_pair(lora, tmp_path / "lora", "full")
    before = {p.name: p.read_bytes() for p in state_path(resume).iterdir()}
    real = torch.save

    def failing(obj, path, *args, **kwargs):
        if Path(path).name == "rng.pt":
            raise OSError("disk full")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainstate.torch, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        _run(data, tmp_path / "lora", save_lora_name="full", save_overwrite=True, train_iterations=2)
    assert {p.name: p.read_bytes() for p in state_path(resume).iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["full-state", "full.safetensors"]
