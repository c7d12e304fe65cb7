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


def test_the_ui_keeps_pytorchs_openmp_default():
    """The product sets no OpenMP policy (a job gets its cores for the whole step, as plain
    PyTorch does); a shared machine sets OMP_WAIT_POLICY=PASSIVE in its environment."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import sys, os, trainer.ui.__main__; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=run_ui.ROOT).stdout.split()
    assert out == ["None", "False"]
