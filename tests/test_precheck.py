"""The checks run when a job is added (trainer/jobs/precheck.py), the same from the CLI; the queue's
per-pass progress and the event feed (no gradio: every profile)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from trainer.cli import main
from trainer.config.schema import TrainConfig
from trainer.training.engine import RunResult
from trainer.training.events import Progress
from trainer.hosts.base import StandaloneHost
from trainer.jobs.queue import JobQueue
from trainer.config.params import ConfigError, GROUPS
from trainer.jobs.precheck import precheck
from trainer.ui import feed, form

from tests.enginekit import make_images, quick_config
from tests.modekit import write_pair


def refused(cfg: TrainConfig, lora_dir, host=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        precheck(cfg, lora_dir, host)
    return info.value


def test_the_image_folder_must_exist_and_hold_images(tmp_path):
    out = tmp_path / "out"
    err = refused(quick_config(tmp_path / "missing"), out)
    assert (err.key, err.problem) == ("lora_data_directory", "folder does not exist")
    err = refused(quick_config(""), out)
    assert err.key == "lora_data_directory" and err.problem.startswith("no image folder given")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    err = refused(quick_config(tmp_path / "empty"), out)
    assert err.key == "lora_data_directory" and err.problem.startswith("folder has no images")
    assert precheck(quick_config(make_images(tmp_path / "data")), out).mode == "LoRA"


def test_the_output_name_must_be_free_unless_overwrite(tmp_path):
    data, out = make_images(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "tiny.safetensors").write_bytes(b"x")
    err = refused(quick_config(data), out)
    assert err.key == "save_lora_name" and "tiny.safetensors already exists" in err.problem
    precheck(quick_config(data, save_overwrite=True), out)
    (out / "tiny.safetensors").unlink()
    (out / "tiny_2steps.safetensors").write_bytes(b"x")  # an intermediate save's name is checked too
    precheck(quick_config(data), out)
    err = refused(quick_config(data, save_per_steps=2), out)
    assert err.key == "save_lora_name" and "tiny_2steps.safetensors already exists" in err.problem


def test_a_pair_must_match_in_size(tmp_path):
    orig, _ = write_pair(tmp_path / "a", size=(64, 64))
    _, targ = write_pair(tmp_path / "b", size=(64, 48))
    for mode in ("Difference", "ADDifT"):
        cfg = TrainConfig(mode=mode, save_lora_name="pair", diff_original_image=str(orig), diff_target_image=str(targ))
        err = refused(cfg, tmp_path / "out")
        assert err.key == "diff_target_image" and "must be the same size" in err.problem
    cfg = TrainConfig(mode="ADDifT", save_lora_name="pair", diff_original_image=str(tmp_path / "nope.png"),
                      diff_target_image=str(targ))
    assert refused(cfg, tmp_path / "out").key == "diff_original_image"


def test_network_files_and_models_must_resolve(tmp_path):
    data, out = make_images(tmp_path / "data"), tmp_path / "out"
    err = refused(quick_config(data, network_resume="gone.safetensors"), out)
    assert err.key == "network_resume" and "file not found" in err.problem
    models = tmp_path / "models"
    models.mkdir()
    host = StandaloneHost(out, [models])
    err = refused(quick_config(data, model="absent"), out, host)
    assert err.key == "model" and "not found" in err.problem
    (models / "here.safetensors").write_bytes(b"x")
    precheck(quick_config(data, model="here"), out, host)


def test_the_cli_refuses_before_loading_a_model(tmp_path, capsys):
    data, out = make_images(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "taken.safetensors").write_bytes(b"x")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(quick_config(data, save_lora_name="taken").to_dict()))
    # the model does not even exist: the output name is refused first, by the same check as the UI's
    assert main(["--preset", str(preset), "--model", str(tmp_path / "m.safetensors"), "--lora-dir", str(out)]) == 2
    assert "save_lora_name: " in capsys.readouterr().err


def test_every_optional_setting_has_a_group_from_the_schema():
    titles = dict(GROUPS)
    grouped = [n for names in form.GROUP_FIELDS.values() for n in names]
    optional = [n for n in form.FORM_FIELDS if form.PARAMS[n].section != "required" and n not in form.SPECIAL]
    assert sorted(grouped) == sorted(optional) and len(grouped) == len(set(grouped))
    assert all(form.PARAMS[n].group in titles for n in optional)
    assert list(titles)[:3] == ["network", "data", "lr"] and all(form.GROUP_FIELDS[k] for k in titles)


def test_errors_are_told_with_the_labels_on_screen():
    where = form.explain(ConfigError("noise_offset_random_strength", True, "needs noise_offset above 0"))
    assert where.text == "Random noise offset: needs 'Noise offset' above 0 (got True)"
    assert (where.elem_id, where.group) == ("traindeck-noise-offset-random-strength", "noise")
    where = form.explain(ConfigError("image_size(height, width)", "9000", "must be at most 8192"))
    assert where.text == "Image size (height, width): must be at most 8192 (got '9000')" and where.group == ""
    where = form.explain(ConfigError("2nd pass.train_iterations", "x", "expected a number"))
    assert (where.label, where.elem_id, where.group) == ("2nd pass: Iterations", "traindeck-2nd-train-iterations",
                                                         "second")
    assert form.explain(ConfigError("job", "x", "is not in the queue")) is None
    with pytest.raises(ConfigError) as info:
        form.config_from(form.form_values(TrainConfig(mode="Difference")), {"train_iterations": "x"})
    assert info.value.key == "2nd pass.train_iterations"


def test_a_new_pass_shows_its_own_loss_and_message(tmp_path):
    seen: list[str] = []
    go = threading.Event()

    def run(cfg, stop, listener):
        def send(**p):
            listener(Progress(phase="training", mode="Difference", name="d", pass_count=2, **p))
            seen.append(feed.describe(queue.current()))
        send(pass_index=1, step=2, total=2, loss=0.5, loss_ema=0.4, it_per_s=3.0, eta_s=0.0,
             message="copier (pass 1)")
        # the engine's first events of pass 2 still carry pass 1's loss, speed and message
        send(pass_index=2, step=0, total=5, loss=0.5, loss_ema=0.4, it_per_s=3.0, eta_s=0.0,
             message="copier (pass 1)")
        send(pass_index=2, step=0, total=5, loss=0.5, loss_ema=0.4, it_per_s=3.0, eta_s=0.0,
             message="difference (pass 2)")
        send(pass_index=2, step=1, total=5, loss=0.25, loss_ema=0.3, it_per_s=2.0, eta_s=2.0,
             message="difference (pass 2)")
        go.wait(10)
        return RunResult("done", None, 5, 0.5, 0.25, 0.1, 1)

    told = []
    queue = JobQueue(tmp_path / "q.json", run, notify=lambda job: told.append(feed.job_event(job)))
    queue.add(TrainConfig(save_lora_name="d"))
    queue.start()
    end = time.monotonic() + 10
    while len(seen) < 4 and time.monotonic() < end:
        time.sleep(0.01)
    row = feed.progress_cell(queue.snapshot()[0])
    go.set()
    assert queue.wait(10)
    assert seen[0] == "training | Difference · d | pass 1/2 | step 2/2 | loss 0.5 (smoothed 0.4) | " \
                      "3.00 it/s, ETA 00:00:00 | copier (pass 1)"
    assert seen[1] == "training | Difference · d | pass 2/2 | step 0/5 | pass 2 of 2"
    assert seen[2] == "training | Difference · d | pass 2/2 | step 0/5 | difference (pass 2)"
    assert "step 1/5 | loss 0.25 (smoothed 0.3)" in seen[3]
    assert row == "pass 2/2 · 1/5 · loss 0.3"
    assert told == ["d: training started", "d done"]
    assert feed.progress_cell(queue.snapshot()[0]) == "5/5 · loss 0.3"  # kept with the result


def test_the_feed_tells_each_page_only_what_it_has_not_shown():
    events = feed.Feed()
    assert events.since(0) == (0, None)
    events.add("a")
    events.add("b")
    assert events.since(0) == (2, "b") and events.since(2) == (2, None)
    for i in range(feed.KEEP + 5):
        events.add(str(i))
    assert events.since(2) == (feed.KEEP + 7, str(feed.KEEP + 4))


def test_queue_rows_say_what_a_running_job_is_doing():
    row = {"state": "running", "phase": "caching", "step": 0, "total": 60, "loss_ema": None, "pass_count": 1}
    assert feed.progress_cell(row) == "caching · 0/60"
    row.update(phase="training", step=12, loss_ema=0.123456)
    assert feed.progress_cell(row) == "12/60 · loss 0.1235"
    assert feed.progress_cell({"state": "queued"}) == ""
    done = {"state": "failed", "steps": 0, "total": 0, "loss": None}
    assert feed.progress_cell(done) == ""  # refused before its first step: nothing to show
