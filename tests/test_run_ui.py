"""run_ui.py's first-run feedback: a line per stage and, while one runs, the time and the log's last line."""
from __future__ import annotations

import time

import run_ui


def test_heartbeat_tells_elapsed_time_and_what_the_log_says(tmp_path, capsys):
    log = tmp_path / "setup.log"
    with run_ui.Heartbeat(log, every=0.05):
        time.sleep(0.12)  # nothing logged yet: the time alone
        log.write_text("$ pip install torch\nCollecting torch==2.13.0\n\n")
        time.sleep(0.2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  ... 0m00s"
    assert lines[-1] == "  ... 0m00s: Collecting torch==2.13.0"
    count = len(lines)
    time.sleep(0.15)
    assert capsys.readouterr().out == "" and count >= 3  # stopped with the stage


def test_last_line_is_short_and_safe(tmp_path):
    assert run_ui.last_line(tmp_path / "missing.log") == ""
    log = tmp_path / "setup.log"
    log.write_bytes(b"x" * 10_000 + b"\nDownloading " + b"y" * 300 + b"\n\xff\n")
    assert run_ui.last_line(log) == "\ufffd"
    log.write_bytes(b"first\nDownloading " + b"y" * 300 + b"\n")
    assert run_ui.last_line(log) == ("Downloading " + "y" * 300)[:120]


def test_the_ui_sets_passive_openmp_waits_before_torch():
    """Spinning OpenMP waiters made the demo's 60 steps take 114 s instead of 15 s on a shared
    2-core machine; the standalone UI sets the passive policy before torch is imported."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import sys, os, trainer.ui.__main__; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=run_ui.ROOT).stdout.split()
    assert out == ["PASSIVE", "False"]


def test_a_first_build_says_where_it_goes_and_keeps_talking(tmp_path, monkeypatch, capsys):
    """The first run names the environment and its log, beats while the build runs, and says when
    it is ready; a later run says which environment it uses."""
    import tests.run_profiles as profiles

    monkeypatch.setenv("TRAINDECK_VENVS", str(tmp_path / "venvs"))
    monkeypatch.setattr(run_ui, "HEARTBEAT_S", 0.05)

    def build(profile):
        venv = profiles.venvs_dir() / f"{profile.name}-{profiles.fingerprint(profile)}"
        venv.mkdir(parents=True)
        (venv / "setup.log").write_text("Collecting gradio==4.40.0\n")
        time.sleep(0.2)
        (venv / profiles.MARKER).write_text("done")
        return venv

    monkeypatch.setattr(profiles, "prepare", build)
    venv = run_ui.prepare_env()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"first run: building the environment in {venv}"
    assert out[2] == f"  every step is logged to {venv / 'setup.log'}"
    assert "  ... 0m00s: Collecting gradio==4.40.0" in out and out[-1].startswith("environment ready (")
    monkeypatch.setattr(profiles, "prepare", lambda profile: venv)
    run_ui.prepare_env()
    assert capsys.readouterr().out.splitlines()[0] == f"using the environment in {venv}"
