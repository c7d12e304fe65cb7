"""A queue job and the journal file that keeps the queue across restarts."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config.schema import TrainConfig
from ..training.events import Progress
from ..fsutil import unique_path, write_json_atomic

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "stopped", "interrupted")
ACTIVE = ("queued", "running")
JOURNAL_VERSION = 1
# What a new pass must not inherit from the previous one when its first event does not set it.
_PER_PASS = {"loss": None, "loss_ema": None, "it_per_s": None, "eta_s": None, "lrs": []}


@dataclass
class Job:
    """One job of the queue. `settings` is TrainConfig.to_dict(), what the journal keeps."""

    id: str
    settings: dict[str, Any]
    state: str = "queued"
    message: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    output: str | None = None
    steps: int = 0
    total: int = 0  # the steps its last pass was to run (kept with the result, for the queue table)
    loss: float | None = None  # its last smoothed loss

    @property
    def name(self) -> str:
        return str(self.settings.get("save_lora_name", ""))

    @property
    def mode(self) -> str:
        return str(self.settings.get("mode", ""))

    def config(self) -> TrainConfig:
        """The job's settings as a TrainConfig (ConfigError if they no longer load)."""
        return TrainConfig.from_dict(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # a deep copy

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        """A journal entry back as a Job; ValueError when it is not one."""
        known = {f.name for f in fields(cls)}
        try:
            job = cls(**{k: v for k, v in data.items() if k in known})
        except (AttributeError, TypeError) as exc:  # not an object, or id/settings missing
            raise ValueError(f"not a job entry: {exc}") from exc
        if not (isinstance(job.id, str) and job.id and isinstance(job.settings, dict) and job.state in STATES):
            raise ValueError(f"job entry with a bad id, settings or state: {job.id!r}, {job.state!r}")
        return job


def read_journal(path: Path) -> list[Job]:
    """The jobs of a journal file; OSError or ValueError when it cannot be read as one."""
    data = json.loads(path.read_text(encoding="utf-8"))  # JSON and UTF-8 errors are ValueErrors
    if not (isinstance(data, dict) and data.get("version") == JOURNAL_VERSION and isinstance(data.get("jobs"), list)):
        raise ValueError(f"not a version {JOURNAL_VERSION} queue journal")
    return [Job.from_dict(entry) for entry in data["jobs"]]


def write_journal(path: Path, jobs: list[Job]) -> None:
    """Replace the journal atomically. A failed write is logged; the queue goes on."""
    data = {"version": JOURNAL_VERSION, "jobs": [job.to_dict() for job in jobs]}
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        log.error("queue journal %s not written: %s", path, exc)


def set_aside(path: Path, exc: Exception) -> None:
    """Keep an unreadable journal for the user under another name (the queue starts empty)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = unique_path(path.with_name(f"{path.name}.corrupt-{stamp}"))
    try:
        path.rename(aside)
        log.warning("queue journal %s is unreadable (%s); kept as %s, the queue starts empty", path, exc, aside)
    except OSError as err:
        log.error("queue journal %s is unreadable (%s) and could not be moved aside (%s)", path, exc, err)


class PassView:
    """One job's progress with only its current pass's own numbers.

    The engine's events carry every field along: when Difference's pass 2 begins, its events
    still hold pass 1's loss, speed and message until pass 2 sets its own. Those carried-over
    values are cleared here, so a status never mixes pass 2's step with pass 1's loss.
    """

    def __init__(self) -> None:
        self._last: Progress | None = None
        self._stale: dict[str, object] = {}

    def __call__(self, p: Progress) -> Progress:
        last, self._last = self._last, Progress(**p.as_dict())
        if last is not None and p.pass_index != last.pass_index:
            self._stale = {key: getattr(last, key) for key in (*_PER_PASS, "message")}
        for key in list(self._stale):
            if getattr(p, key) != self._stale[key]:
                del self._stale[key]  # the new pass has set its own
            elif key == "message":
                p.message = f"pass {p.pass_index} of {p.pass_count}"
            else:
                setattr(p, key, list(_PER_PASS[key]) if isinstance(_PER_PASS[key], list) else None)
        return p
