"""The training queue: jobs run in order on one worker thread; the list is journaled to disk.

The journal is replaced atomically after every change, so a restart (even after kill -9)
lists the pending jobs again. They run only on start(): a crash must not turn into an
unattended GPU job.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.schema import TrainConfig
from ..training.events import JobStopped, Listener, Progress, StopFlag
from .journal import ACTIVE, STATES, Job, PassView, read_journal, set_aside, write_journal
from ..config.params import ConfigError

if TYPE_CHECKING:  # the engine imports torch; the queue itself needs nothing of it
    from ..training.engine import RunResult

log = logging.getLogger(__name__)

RunJob = Callable[[TrainConfig, StopFlag, Listener], "RunResult"]
Notify = Callable[[Job], None]
# How a job is expected to fail: TrainingFailed and torch's out-of-memory are RuntimeErrors,
# ConfigError is a ValueError. These end the job with their text; others also get a traceback.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


class JobQueue:
    """An ordered list of jobs, one worker thread, and a journal file. Thread-safe."""

    def __init__(self, journal: Path | str, run_job: RunJob, notify: Notify | None = None):
        self.journal = Path(journal)
        self._run_job = run_job
        self._notify = notify  # told (outside the lock) when a job starts and when it ends
        # One lock guards everything below; the condition lets wait() sleep until idle.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._jobs: list[Job] = []
        self._progress: dict[str, Progress] = {}  # in memory only: never journaled per step
        self._stop_flag: StopFlag | None = None  # of the running job
        self._thread: threading.Thread | None = None
        self._paused = False
        with self._lock:
            self._load()

    # ---- journal -------------------------------------------------------
    def _load(self) -> None:
        """Read the journal; a job that was running when the program died is `interrupted`."""
        if not self.journal.exists():
            return
        try:
            jobs = read_journal(self.journal)
        except (OSError, ValueError) as exc:
            set_aside(self.journal, exc)
            return
        interrupted = [job for job in jobs if job.state == "running"]
        for job in interrupted:
            job.state = "interrupted"
            job.message = "interrupted: the program ended while this job was running"
        self._jobs = jobs
        if interrupted:
            self._save()

    def _save(self) -> None:
        """Journal every job (the lock is held)."""
        write_journal(self.journal, self._jobs)

    # ---- editing -------------------------------------------------------
    def add(self, cfg: TrainConfig) -> Job:
        """Validate and enqueue a job (a copy is returned). Does not start the queue."""
        settings = cfg.validate().to_dict()
        with self._lock:
            self._check_name_free(cfg.save_lora_name)
            job = Job(self._new_id(), settings)
            self._jobs.append(job)
            self._save()
            return Job.from_dict(job.to_dict())

    def retry(self, job_id: str) -> Job:
        """Queue a finished (done, failed, stopped, interrupted) job again, at its place."""
        with self._lock:
            job = self._find(job_id)
            if job.state in ACTIVE:
                raise ConfigError("job", job_id, f"is already {job.state}")
            self._check_name_free(job.name)
            job.state, job.message, job.started, job.finished, job.output, job.steps = "queued", "", None, None, None, 0
            job.total, job.loss = 0, None
            self._progress.pop(job.id, None)
            self._save()
            return Job.from_dict(job.to_dict())

    def remove(self, job_id: str) -> None:
        """Delete any job but the running one."""
        with self._lock:
            job = self._find(job_id)
            if job.state == "running":
                raise ConfigError("job", job_id, "is running; stop it before removing it")
            self._jobs.remove(job)
            self._progress.pop(job.id, None)
            self._save()

    def move(self, job_id: str, offset: int) -> int:
        """Move a job `offset` rows (up = -1, down = +1), clamped to the list; its new index."""
        with self._lock:
            job = self._find(job_id)
            old = self._jobs.index(job)
            new = max(0, min(len(self._jobs) - 1, old + int(offset)))
            if new != old:
                self._jobs.insert(new, self._jobs.pop(old))
                self._save()
            return new

    def clear(self) -> int:
        """Remove every job that is not running (finished ones too); how many went."""
        with self._lock:
            removed = len(self._jobs)
            self._jobs = [job for job in self._jobs if job.state == "running"]
            self._progress = {job.id: self._progress[job.id] for job in self._jobs if job.id in self._progress}
            removed -= len(self._jobs)
            if removed:
                self._save()
            return removed

    def _find(self, job_id: str) -> Job:
        job = next((j for j in self._jobs if j.id == job_id), None)
        if job is None:
            raise ConfigError("job", job_id, "is not in the queue")
        return job

    def _check_name_free(self, name: str) -> None:
        # Case-insensitive: on Windows and macOS "Cat" and "cat" are the same output file.
        key = name.casefold()
        if any(job.state in ACTIVE and job.name.casefold() == key for job in self._jobs):
            raise ConfigError("save_lora_name", name, "is already queued or running")

    def _new_id(self) -> str:
        taken = {job.id for job in self._jobs}
        job_id = uuid.uuid4().hex[:8]
        while job_id in taken:  # 32 bits: a clash is rare, but a duplicate id would be a real bug
            job_id = uuid.uuid4().hex[:8]
        return job_id

    # ---- running -------------------------------------------------------
    def start(self) -> bool:
        """Start the worker (if not running and a job is queued); whether one is running now."""
        with self._lock:
            self._paused = False
            if self._thread is None and any(job.state == "queued" for job in self._jobs):
                self._thread = threading.Thread(target=self._work, name="traindeck-queue", daemon=True)
                self._thread.start()
            return self._thread is not None

    def stop(self, save: bool = False) -> bool:
        """Ask the running job to stop and pause the queue until start(); whether a job was asked."""
        with self._lock:
            self._paused = True
            if self._stop_flag is not None:
                self._stop_flag.request(save)
            return self._stop_flag is not None

    def _work(self) -> None:
        """The worker thread: take queued jobs in order until none is left or the queue is paused."""
        job: Job | None = None
        try:
            while True:
                with self._lock:
                    job = self._take_next()
                    if job is None:
                        # Cleared under the same lock as the decision, so a start() racing with
                        # this exit either sees the worker gone or the job it added gets taken.
                        self._thread = None
                        self._idle.notify_all()
                        return
                    stop = self._stop_flag = StopFlag()
                    started = Job.from_dict(job.to_dict())
                self._tell(started)
                self._run_one(job, stop)
        except BaseException:
            # Only a fault of the queue itself or an interpreter exit gets here (_run_one handles
            # the jobs' errors): leave no job "running" and no worker marked alive, then re-raise.
            with self._lock:
                if job is not None and job.state == "running":
                    self._finish(job, "interrupted", "interrupted: the queue worker ended")
                self._thread = None
                self._stop_flag = None
                self._idle.notify_all()
            raise

    def _take_next(self) -> Job | None:
        """Mark the first queued job running (the lock is held); None when paused or empty."""
        if self._paused:
            return None
        job = next((j for j in self._jobs if j.state == "queued"), None)
        if job is None:
            return None
        job.state, job.message, job.started = "running", "", time.time()
        self._progress[job.id] = Progress(mode=job.mode, name=job.name)
        self._save()
        return job

    def _tell(self, job: Job) -> None:
        """The notify callback, outside the lock; its failure is logged, never the queue's."""
        if self._notify is None:
            return
        try:
            self._notify(job)
        except Exception:  # a listener's bug must not stop the queue; it is logged with its traceback
            log.exception("queue notification for job %s failed", job.id)

    def _run_one(self, job: Job, stop: StopFlag) -> None:
        """Run one job outside the lock and record how it ended; a job's error never escapes."""
        own_pass = PassView()

        def listener(progress: Progress) -> None:
            with self._lock:
                self._progress[job.id] = own_pass(progress)

        output, steps = None, 0
        try:
            result = self._run_job(job.config(), stop, listener)
            output = str(result.output) if result.output else None
            steps = result.steps
            if result.status == "done":
                state, message = "done", result.message or (f"saved {output}" if output else "done")
            elif result.status == "stopped":
                state, message = "stopped", result.message or "stopped"
            else:
                log.error("job %s (%s) ended with an unknown status %r", job.id, job.name, result.status)
                state, message = "failed", f"unknown result status {result.status!r}"
        except JobStopped:
            state, message = "stopped", "stopped"
        except EXPECTED_ERRORS as exc:
            log.warning("job %s (%s) failed: %s", job.id, job.name, exc)
            state, message = "failed", str(exc) or type(exc).__name__
        except Exception as exc:
            log.exception("job %s (%s) failed with an unexpected error", job.id, job.name)
            state, message = "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._finish(job, state, message, output, steps)
            self._stop_flag = None  # stop() between jobs must not report a finished job as asked
            ended = Job.from_dict(job.to_dict())
        self._tell(ended)

    def _finish(self, job: Job, state: str, message: str, output: str | None = None, steps: int = 0) -> None:
        job.state, job.message, job.finished, job.output, job.steps = state, message, time.time(), output, steps
        p = self._progress.get(job.id)
        if p is not None:
            job.total = p.total
            job.loss = p.loss_ema if p.loss_ema is not None and math.isfinite(p.loss_ema) else None
        self._save()

    # ---- reading -------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per job, in queue order (a copy)."""
        with self._lock:
            return [self._row(job) for job in self._jobs]

    def _row(self, job: Job) -> dict[str, Any]:
        row = job.to_dict()
        del row["settings"]
        p = self._progress.get(job.id)
        live: dict[str, Any] = dict.fromkeys(("phase", "step", "loss_ema", "pass_index", "pass_count"))
        if p is not None:
            loss = p.loss_ema if p.loss_ema is not None and math.isfinite(p.loss_ema) else None  # NaN isn't JSON
            live = {"phase": p.phase, "step": p.step, "total": p.total, "loss_ema": loss,
                    "pass_index": p.pass_index, "pass_count": p.pass_count}
        return {**row, "name": job.name, "mode": job.mode, **live}

    def get(self, job_id: str) -> Job:
        """A copy of one job (e.g. to load its settings back into a form)."""
        with self._lock:
            return Job.from_dict(self._find(job_id).to_dict())

    def current(self) -> Progress | None:
        """The last Progress of the running job (a copy), or None."""
        with self._lock:
            job = next((j for j in self._jobs if j.state == "running"), None)
            p = self._progress.get(job.id) if job is not None else None
            return Progress(**p.as_dict()) if p is not None else None

    @property
    def running(self) -> bool:
        """Whether the worker thread is active."""
        with self._lock:
            return self._thread is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker is idle; False if `timeout` seconds passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._thread is None, timeout)

    def close(self, timeout: float | None = None, save: bool = False) -> bool:
        """Stop the running job, pause the queue and join the worker; whether it ended in time."""
        with self._lock:
            thread = self._thread
        self.stop(save)
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()


__all__ = ["STATES", "Job", "JobQueue", "Notify", "RunJob"]
