"""What the tabs show about jobs, without gradio: status lines, queue rows and the event feed.

The feed is the app's latest events (a job added, started, done, failed, stopped), numbered,
so each open page can show in its Message box the ones it has not shown yet.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from ..training.events import Progress
from ..jobs.journal import Job

QUEUE_HEADERS = ["#", "id", "name", "mode", "state", "progress", "result"]
KEEP = 50  # events kept; a page more than this far behind shows only the newest


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def describe(p: Progress) -> str:
    """One status line: mode, job, pass, step/total, raw and smoothed loss, speed, ETA, message."""
    parts = [f"{p.phase}", f"{p.mode} · {p.name}"]
    if p.pass_count > 1:
        parts.append(f"pass {p.pass_index}/{p.pass_count}")
    if p.total:
        parts.append(f"step {p.step}/{p.total}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.5g} (smoothed {p.loss_ema:.5g})")
    if p.it_per_s:
        parts.append(f"{p.it_per_s:.2f} it/s, ETA {_eta(p.eta_s)}")
    if p.message:
        parts.append(p.message)
    return " | ".join(parts)


def progress_cell(row: dict[str, Any]) -> str:
    """The queue table's progress: pass, step/total and smoothed loss, live or as the job ended."""
    state = row["state"]
    if state == "queued":
        return ""
    if state == "running":
        step, total, loss, phase = row.get("step") or 0, row.get("total") or 0, row.get("loss_ema"), row.get("phase")
    else:
        step, total, loss, phase = row.get("steps") or 0, row.get("total") or 0, row.get("loss"), None
    parts = [phase] if phase and phase != "training" else []
    passes = row.get("pass_count") or 1
    if passes > 1 and state == "running":
        parts.append(f"pass {row.get('pass_index') or 1}/{passes}")
    if total or step:
        parts.append(f"{step}/{total or '?'}")
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    return " · ".join(parts)


def queue_rows(snapshot: list[dict[str, Any]]) -> list[list[Any]]:
    """The queue table: one row per job, with its progress and its result (or error)."""
    return [[i, r["id"], r["name"], r["mode"], r["state"], progress_cell(r), r["message"]]
            for i, r in enumerate(snapshot, start=1)]


def job_event(job: Job) -> str:
    """The feed's line when a job starts or ends."""
    if job.state == "running":
        return f"{job.name}: training started"
    result = f": {job.message}" if job.message and job.message != job.state else ""
    return f"{job.name} {job.state}{result}"


class Feed:
    """The latest events, numbered from 1; thread-safe (the queue's worker appends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[int, str]] = []
        self._seq = 0

    def add(self, text: str) -> int:
        with self._lock:
            self._seq += 1
            self._events = [*self._events[-(KEEP - 1):], (self._seq, text)]
            return self._seq

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def since(self, seen: int) -> tuple[int, str | None]:
        """(newest number, newest event text) when there are events after `seen`, else (seen, None)."""
        with self._lock:
            if self._seq <= seen or not self._events:
                return seen, None
            return self._seq, self._events[-1][1]
