"""Helpers for the kill -9 tests: child processes to kill, and how to kill and reap them.

Run as a module, it is the child of the journal tests:
    python -m tests.killkit churn JOURNAL SEED   edit a JobQueue in a tight loop until killed
    python -m tests.killkit hold JOURNAL         hold one job 'running' until killed
Each child ends by itself after LIFETIME seconds, so an orphan never runs on.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
LIFETIME = 60.0  # seconds a child lives at most


# ---- the parent's side -----------------------------------------------------
def child_env(tmp: Path) -> dict[str, str]:
    """The environment of a child: this checkout first, logs under `tmp`, one thread, offline."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), TRAINDECK_LOGS=str(tmp / "logs"), TRAINDECK_JSONS=str(tmp / "jsons"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def spawn(args: list[str], tmp: Path, stderr: IO[bytes] | None = None) -> subprocess.Popen:
    """Start `python ARGS` in the repository root with child_env()."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(tmp),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL)


def kill_and_reap(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGKILL `proc` (if it still runs) and wait for it; its return code (-9 when killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout)


def temp_files(folder: Path) -> set[str]:
    """Names of the atomic writers' temp files (`.<name>.*.tmp`) in `folder`."""
    try:
        return {n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def target_of(temp_name: str) -> str:
    """The final file name a temp file `.<name>.<random>.tmp` was going to replace."""
    return temp_name[1:-len(".tmp")].rsplit(".", 1)[0]


def wait_for_temp(proc: subprocess.Popen, folder: Path, prefix: str, known: set[str], deadline: float) -> bool:
    """Poll until a new temp file starting with `prefix` appears; False if the child ended first."""
    while proc.poll() is None and time.monotonic() < deadline:
        if any(n.startswith(prefix) for n in temp_files(folder) - known):
            return True
        time.sleep(0.0005)
    return False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the children ----------------------------------------------------------
def quick_run(cfg, stop, listener) -> SimpleNamespace:
    """A run_job that finishes at once (what JobQueue reads of a RunResult)."""
    return SimpleNamespace(status="done", output=None, steps=1, message="done")


def churn(journal: Path, seed: int) -> None:
    """Add, remove, move, retry, clear and run jobs as fast as possible: every change rewrites the journal."""
    from trainer.config.schema import TrainConfig
    from trainer.jobs.queue import JobQueue
    from trainer.config.params import ConfigError

    rng = random.Random(seed)
    queue = JobQueue(journal, quick_run)
    end = time.monotonic() + LIFETIME
    n = 0
    while time.monotonic() < end:
        rows = queue.snapshot()
        idle = [r["id"] for r in rows if r["state"] != "running"]
        finished = [r["id"] for r in rows if r["state"] not in ("queued", "running")]
        op = rng.random()
        try:
            if len(rows) < 4 or op < 0.35:
                n += 1
                queue.add(TrainConfig(save_lora_name=f"j{seed}-{n}", network_rank=rng.randint(1, 64)))
            elif op < 0.55 and idle:
                queue.remove(rng.choice(idle))
            elif op < 0.75:
                queue.move(rng.choice(rows)["id"], rng.choice((-2, -1, 1, 2)))
            elif op < 0.85 and finished:
                queue.retry(rng.choice(finished))
            elif op < 0.87 or len(rows) > 12:
                queue.clear()
            else:
                queue.start()
        except ConfigError:  # the worker took the chosen job meanwhile (it is running, or done)
            continue


def hold(journal: Path) -> None:
    """Queue two jobs and start: the first blocks in run_job, so it stays 'running' until the kill."""
    from trainer.config.schema import TrainConfig
    from trainer.jobs.queue import JobQueue

    gate = threading.Event()

    def blocked_run(cfg, stop, listener) -> SimpleNamespace:
        gate.wait(LIFETIME)
        return quick_run(cfg, stop, listener)

    queue = JobQueue(journal, blocked_run)
    queue.add(TrainConfig(save_lora_name="held"))
    queue.add(TrainConfig(save_lora_name="after"))
    queue.start()
    gate.wait(LIFETIME)
    queue.close(5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.killkit")
    sub = parser.add_subparsers(dest="what", required=True)
    p_churn = sub.add_parser("churn")
    p_churn.add_argument("journal", type=Path)
    p_churn.add_argument("seed", type=int)
    p_hold = sub.add_parser("hold")
    p_hold.add_argument("journal", type=Path)
    args = parser.parse_args(argv)
    if args.what == "churn":
        churn(args.journal, args.seed)
    else:
        hold(args.journal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
