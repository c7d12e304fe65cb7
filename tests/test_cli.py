"""The headless CLI: python -m trainer --preset FILE --model PATH --lora-dir DIR --set k=v."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.config.schema import TrainConfig

from tests.enginekit import make_images, quick_config
from tests.ldm_export import write_single_file
from tests.tiny import tiny_bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny SD1 checkpoint in the A1111 single-file layout, with its .yaml."""
    return write_single_file(tiny_bundle("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors")


@pytest.fixture()
def job(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path / "logs"))
    data = make_images(tmp_path / "data")
    preset = tmp_path / "job.json"
    preset.write_text(json.dumps(quick_config(data, train_iterations=3).to_dict()))
    return preset, tmp_path / "out"


def test_cli_trains_and_prints_a_json_summary(job, model_file, capsys):
    preset, out = job
    code = main(["--preset", str(preset), "--model", str(model_file), "--lora-dir", str(out),
                 "--set", "train_iterations=2", "--set", "save_lora_name=cli", "--quiet"])
    assert code == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["output"] == str(out / "cli.safetensors") and Path(summary["output"]).is_file()
    assert f"saved {out / 'cli.safetensors'}" in printed.err  # where the run left its file
    assert summary["steps"] == 2 and summary["seconds"] > 0
    assert isinstance(summary["loss_first"], float) and isinstance(summary["loss_last"], float)


@pytest.mark.parametrize("sets,fragment", [
    (["train_batch_size=abc"], "train_batch_size: expected a number (got 'abc')"),
    (["no_such=1"], "unknown setting 'no_such'"),
    (["novalue"], "expected KEY=VALUE"),
    (["save_lora_name=../../etc"], "save_lora_name"),
    (["lora_data_directory=/nonexistent/folder"], "lora_data_directory"),
])
def test_bad_input_exits_non_zero_and_names_the_field(job, model_file, capsys, sets, fragment):
    preset, out = job
    argv = ["--preset", str(preset), "--model", str(model_file), "--lora-dir", str(out), "--quiet"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_model_and_bad_preset_are_clear(job, tmp_path, capsys):
    preset, out = job
    assert main(["--preset", str(preset), "--model", str(tmp_path / "nope.safetensors"), "--lora-dir", str(out)]) == 2
    assert "model" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    assert main(["--preset", str(broken), "--lora-dir", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_help_lists_every_parameter_from_the_schema():
    text = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    for _, p in TrainConfig.params():
        assert f"\n  {p.key}\n" in text, p.key


def test_module_entry_point_runs_a_job(job, model_file):
    preset, out = job
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", str(preset), "--model", str(model_file),
         "--lora-dir", str(out), "--set", "train_iterations=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 1
    assert (out / "tiny.safetensors").is_file()


def test_the_cli_keeps_pytorchs_thread_defaults(tmp_path):
    """The CLI sets no OpenMP policy and no thread count: a job gets every core it is given."""
    probe = ("import atexit, os, sys, torch\n"
             "cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()\n"
             "atexit.register(lambda: print('PROBE', os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads(), cores))\n"
             "sys.argv = ['trainer', '--help']\n"
             "import runpy\n"
             "runpy.run_module('trainer', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    line = next(l for l in done.stdout.splitlines() if l.startswith("PROBE"))
    _, policy, threads, cores = line.split()
    assert policy == "None" and threads == cores
