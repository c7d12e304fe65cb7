"""The job queue: order, names, editing, failures, stop/start, journal and restart, threads."""
from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from trainer.config.schema import TrainConfig
from trainer.training.engine import RunResult, Trainer, TrainingFailed
from trainer.training.events import JobStopped, Progress
from trainer.jobs.queue import Job, JobQueue
from trainer.config.params import ConfigError

from tests.enginekit import MemoryHost, make_images, quick_config

T = 5.0  # safety timeout of every wait; the tests pass in milliseconds


class FakeRun:
    """A run_job that records calls; a job can be made to block until released or stopped, or raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.configs: list[TrainConfig] = []
        self.started: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}
        self.errors: dict[str, BaseException] = {}
        self.stop_save: dict[str, bool] = {}
        self.active = 0
        self.most_active = 0  # jobs running at the same time, at most: must stay 1
        self._count = threading.Lock()

    def block(self, name: str) -> threading.Event:
        self.gates[name] = threading.Event()
        return self.gates[name]

    def began(self, name: str) -> bool:
        return self.started.setdefault(name, threading.Event()).wait(T)

    def __call__(self, cfg, stop, listener) -> RunResult:
        with self._count:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            return self._run(cfg, stop, listener)
        finally:
            with self._count:
                self.active -= 1

    def _run(self, cfg, stop, listener) -> RunResult:
        name = cfg.save_lora_name
        self.calls.append(name)
        self.configs.append(cfg)
        listener(Progress(phase="training", mode=cfg.mode, name=name, step=1, total=2, loss_ema=0.25))
        self.started.setdefault(name, threading.Event()).set()
        gate = self.gates.get(name)
        while gate is not None and not gate.wait(0.005):
            if stop.requested:
                self.stop_save[name] = stop.save
                return RunResult("stopped", None, 1, 0.5, 0.25, 0.01, 7, message="stopped at step 1; nothing saved")
        if name in self.errors:
            raise self.errors[name]
        out = Path("/lora") / f"{name}.safetensors"
        return RunResult("done", out, 2, 0.5, 0.2, 0.01, 7, message=f"saved {out}")


@pytest.fixture()
def fake():
    return FakeRun()


@pytest.fixture()
def journal(tmp_path):
    return tmp_path / "state" / "queue.json"


@pytest.fixture()
def queue(journal, fake):
    q = JobQueue(journal, fake)
    yield q
    for gate in fake.gates.values():
        gate.set()
    assert q.close(T)


def cfg(name: str, **over) -> TrainConfig:
    return TrainConfig(save_lora_name=name, **over)


def names(q: JobQueue) -> list[str]:
    return [row["name"] for row in q.snapshot()]


def states(q: JobQueue) -> dict[str, str]:
    return {row["name"]: row["state"] for row in q.snapshot()}


def check_journal(q: JobQueue, journal: Path) -> dict:
    """The file on disk parses, is version 1, and says what snapshot() says; no temp files left."""
    data = json.loads(journal.read_text(encoding="utf-8"))
    assert data["version"] == 1
    on_disk = [(j["id"], j["settings"]["save_lora_name"], j["settings"]["mode"], j["state"], j["message"],
                j["created"], j["started"], j["finished"], j["output"], j["steps"]) for j in data["jobs"]]
    keys = ("id", "name", "mode", "state", "message", "created", "started", "finished", "output", "steps")
    assert on_disk == [tuple(row[k] for k in keys) for row in q.snapshot()]
    assert sorted(p.name for p in journal.parent.iterdir() if p.name.startswith(".")) == []
    return data


def test_add_does_not_run_start_runs_in_order(queue, fake, journal):
    jobs = [queue.add(cfg(n)) for n in ("a", "b", "c")]
    assert fake.calls == [] and not queue.running and queue.wait(0)
    assert queue.start() is True
    assert queue.wait(T) and not queue.running
    assert fake.calls == ["a", "b", "c"] and fake.most_active == 1
    rows = queue.snapshot()
    assert [r["id"] for r in rows] == [j.id for j in jobs] and len({j.id for j in jobs}) == 3
    assert [r["state"] for r in rows] == ["done"] * 3
    first = rows[0]
    assert first["message"] == "saved /lora/a.safetensors" and first["output"] == "/lora/a.safetensors"
    assert first["steps"] == 2 and first["step"] == 1 and first["total"] == 2 and first["mode"] == "LoRA"
    assert first["started"] >= first["created"] and first["finished"] >= first["started"]
    assert queue.start() is False  # nothing queued: no worker
    check_journal(queue, journal)


def test_the_job_receives_its_own_settings(queue, fake):
    original = cfg("x", network_rank=8, image_size=[64, 32], train_optimizer_settings="weight_decay=0.01")
    queue.add(original)
    queue.start()
    assert queue.wait(T)
    assert fake.configs == [original]


def test_start_returns_at_once_and_shows_progress(queue, fake):
    gate = fake.block("a")
    queue.add(cfg("a"))
    queue.add(cfg("b"))
    assert queue.start() is True and fake.began("a")
    assert queue.running and queue.start() is True  # a second start adds no second worker
    assert not queue.wait(0.02)
    assert fake.calls == ["a"] and fake.most_active == 1
    p = queue.current()
    assert isinstance(p, Progress) and (p.name, p.step, p.total, p.loss_ema) == ("a", 1, 2, 0.25)
    row = queue.snapshot()[0]
    assert row["state"] == "running" and row["phase"] == "training" and row["loss_ema"] == 0.25
    gate.set()
    assert queue.wait(T) and queue.current() is None
    assert fake.calls == ["a", "b"] and fake.most_active == 1


def test_duplicate_name_refused_while_queued_or_running(queue, fake):
    gate = fake.block("a")
    queue.add(cfg("a"))
    with pytest.raises(ConfigError) as err:
        queue.add(cfg("a"))
    assert err.value.key == "save_lora_name" and "already queued or running" in str(err.value)
    queue.start()
    assert fake.began("a")
    for again in ("a", "A"):  # case-insensitive: the same file on Windows and macOS
        with pytest.raises(ConfigError):
            queue.add(cfg(again))
    gate.set()
    assert queue.wait(T)
    job = queue.add(cfg("a"))  # finished: the name is free again
    assert job.state == "queued" and names(queue) == ["a", "a"]


def test_invalid_config_is_refused_and_not_queued(queue, journal):
    with pytest.raises(ConfigError) as err:
        queue.add(cfg(""))
    assert err.value.key == "save_lora_name"
    with pytest.raises(ConfigError):
        queue.add(cfg("ok", train_min_timesteps=900, train_max_timesteps=100))
    assert queue.snapshot() == [] and not journal.exists()


def test_remove_first_and_middle_rows(queue, fake, journal):
    ids = {n: queue.add(cfg(n)).id for n in ("a", "b", "c", "d", "e")}
    queue.remove(ids["a"])
    assert names(queue) == ["b", "c", "d", "e"]
    check_journal(queue, journal)
    queue.remove(ids["d"])
    assert names(queue) == ["b", "c", "e"]
    check_journal(queue, journal)
    with pytest.raises(ConfigError) as err:
        queue.remove("nosuchid")
    assert err.value.key == "job"
    queue.start()
    assert queue.wait(T) and fake.calls == ["b", "c", "e"]
    queue.remove(ids["c"])  # finished rows can be deleted too
    assert names(queue) == ["b", "e"]


def test_the_running_job_cannot_be_removed(queue, fake):
    gate = fake.block("a")
    job = queue.add(cfg("a"))
    queue.start()
    assert fake.began("a")
    with pytest.raises(ConfigError) as err:
        queue.remove(job.id)
    assert err.value.key == "job" and "running" in str(err.value)
    assert states(queue) == {"a": "running"}
    gate.set()
    assert queue.wait(T) and states(queue) == {"a": "done"}


def test_move_up_down_and_clamp(queue, fake, journal):
    ids = {n: queue.add(cfg(n)).id for n in ("a", "b", "c")}
    assert queue.move(ids["c"], -1) == 1 and names(queue) == ["a", "c", "b"]
    assert queue.move(ids["a"], -1) == 0 and names(queue) == ["a", "c", "b"]  # already first
    assert queue.move(ids["c"], +5) == 2 and names(queue) == ["a", "b", "c"]  # clamped to last
    assert queue.move(ids["a"], +1) == 1 and names(queue) == ["b", "a", "c"]
    assert queue.move(ids["c"], -10) == 0 and names(queue) == ["c", "b", "a"]
    check_journal(queue, journal)
    with pytest.raises(ConfigError):
        queue.move("nosuchid", 1)
    queue.start()
    assert queue.wait(T) and fake.calls == ["c", "b", "a"]


def test_clear_keeps_only_the_running_job(queue, fake, journal):
    queue.add(cfg("old"))
    queue.start()
    assert queue.wait(T)
    gate = fake.block("a")
    queue.add(cfg("a"))
    queue.add(cfg("b"))
    queue.start()
    assert fake.began("a")
    assert queue.clear() == 2  # the finished "old" and the queued "b"
    assert states(queue) == {"a": "running"}
    check_journal(queue, journal)
    gate.set()
    assert queue.wait(T) and fake.calls == ["old", "a"]
    assert queue.clear() == 1 and queue.snapshot() == []


def test_failing_jobs_do_not_stop_the_queue(queue, fake, journal, caplog):
    fake.errors = {
        "nan": TrainingFailed("loss became NaN at step 3"),
        "cfg": ConfigError("lora_data_directory", "/nope", "no images found"),
        "oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        "disk": OSError(28, "No space left on device"),
        "stopped": JobStopped(),
        "bug": KeyError("surprise"),
    }
    for n in ("nan", "cfg", "oom", "disk", "stopped", "bug", "fine"):
        queue.add(cfg(n))
    with caplog.at_level(logging.WARNING, logger="trainer.jobs.queue"):
        queue.start()
        assert queue.wait(T)
    assert fake.calls == ["nan", "cfg", "oom", "disk", "stopped", "bug", "fine"]
    rows = {r["name"]: r for r in queue.snapshot()}
    assert {n: r["state"] for n, r in rows.items()} == {
        "nan": "failed", "cfg": "failed", "oom": "failed", "disk": "failed", "stopped": "stopped",
        "bug": "failed", "fine": "done"}
    assert rows["nan"]["message"] == "loss became NaN at step 3"
    assert "no images found" in rows["cfg"]["message"] and "out of memory" in rows["oom"]["message"]
    assert "No space left" in rows["disk"]["message"]
    assert rows["bug"]["message"] == "KeyError: 'surprise'"
    # expected failures are logged without a traceback, the unexpected one with it
    by_job = {r.getMessage().split("(")[1].split(")")[0]: r for r in caplog.records if "failed" in r.getMessage()}
    assert by_job["nan"].exc_info is None and by_job["bug"].exc_info is not None
    check_journal(queue, journal)


def test_a_bad_result_status_fails_the_job(journal):
    q = JobQueue(journal, lambda c, s, l: RunResult("weird", None, 0, None, None, 0.0, 1))
    q.add(cfg("a"))
    q.start()
    assert q.wait(T)
    assert states(q) == {"a": "failed"} and "weird" in q.snapshot()[0]["message"]


def test_stop_stops_the_job_and_pauses_the_queue(queue, fake, journal):
    fake.block("a")  # never released: only the stop ends it
    queue.add(cfg("a"))
    queue.add(cfg("b"))
    queue.start()
    assert fake.began("a")
    assert queue.stop(save=True) is True
    assert queue.wait(T) and not queue.running
    assert fake.stop_save == {"a": True}
    assert states(queue) == {"a": "stopped", "b": "queued"} and fake.calls == ["a"]
    assert queue.snapshot()[0]["message"] == "stopped at step 1; nothing saved"
    check_journal(queue, journal)
    assert queue.stop() is False  # paused between jobs: no job to ask
    assert queue.start() is True and queue.wait(T)
    assert fake.calls == ["a", "b"] and states(queue) == {"a": "stopped", "b": "done"}


def test_stop_while_idle_pauses_and_start_resumes(queue, fake):
    queue.add(cfg("a"))
    assert queue.stop() is False  # no job to ask
    assert queue.start() is True and queue.wait(T) and fake.calls == ["a"]


def test_restart_lists_pending_jobs_and_runs_nothing_until_start(tmp_path, journal, fake):
    first = JobQueue(journal, fake)
    fake.block("a")
    ids = {n: first.add(cfg(n)).id for n in ("a", "b")}
    done = first.add(cfg("c"))
    first.move(done.id, -2)
    first.start()
    assert fake.began("a")  # c ran, a is running, b waits
    crashed = tmp_path / "crashed.json"
    shutil.copy(journal, crashed)  # the journal as a kill -9 would leave it
    first.close(T)

    fresh = FakeRun()
    second = JobQueue(crashed, fresh)
    rows = {r["name"]: r for r in second.snapshot()}
    assert [r["name"] for r in second.snapshot()] == ["c", "a", "b"]
    assert {n: r["state"] for n, r in rows.items()} == {"c": "done", "a": "interrupted", "b": "queued"}
    assert "interrupted" in rows["a"]["message"] and rows["a"]["id"] == ids["a"]
    assert not second.running and fresh.calls == []
    check_journal(second, crashed)  # the interrupted state is journaled at once
    with pytest.raises(ConfigError):
        second.add(cfg("b"))  # still queued after the restart
    assert second.start() is True and second.wait(T)
    assert fresh.calls == ["b"]  # the interrupted job is not rerun by itself
    second.retry(ids["a"])
    assert states(second)["a"] == "queued"
    assert second.start() and second.wait(T) and fresh.calls == ["b", "a"]
    check_journal(second, crashed)


def test_retry_refuses_active_jobs_and_taken_names(queue, fake):
    fake.errors["a"] = ValueError("boom")
    job = queue.add(cfg("a"))
    with pytest.raises(ConfigError):
        queue.retry(job.id)  # queued already
    queue.start()
    assert queue.wait(T) and states(queue) == {"a": "failed"}
    queue.add(cfg("a"))
    with pytest.raises(ConfigError):
        queue.retry(job.id)  # another "a" is queued
    assert queue.get(job.id).state == "failed"


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", b"[1, 2]", b'{"version": 99, "jobs": []}',
                                     b'{"version": 1, "jobs": [{"id": 3}]}',
                                     b'{"version": 1, "jobs": [{"id": "x", "settings": {}, "state": "odd"}]}'])
def test_a_corrupt_journal_is_set_aside(journal, fake, caplog, content):
    journal.parent.mkdir(parents=True)
    journal.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="trainer.jobs.queue"):
        q = JobQueue(journal, fake)
    assert q.snapshot() == [] and not journal.exists()
    aside = list(journal.parent.glob("queue.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert str(aside[0]) in caplog.text
    q.add(cfg("a"))  # and the queue works on a fresh journal
    check_journal(q, journal)
    assert JobQueue(journal, fake).snapshot()[0]["name"] == "a"
    assert len(list(journal.parent.glob("queue.json.corrupt-*"))) == 1


def test_concurrent_adds_lose_nothing_and_admit_no_duplicate(queue, journal, monkeypatch):
    real_uuid4 = uuid.uuid4

    def slow_uuid4():
        # Job ids are drawn between the name check and the append: a pause there lets the
        # other threads in, so a check-then-append outside the lock admits duplicates.
        time.sleep(0.001)
        return real_uuid4()

    monkeypatch.setattr(uuid, "uuid4", slow_uuid4)
    _add_from_threads(queue, journal)


def _add_from_threads(queue: JobQueue, journal: Path) -> None:
    wanted = [f"job{i:02d}" for i in range(50)] * 2
    random.Random(3).shuffle(wanted)
    barrier = threading.Barrier(8)
    added: list[Job] = []
    refused: list[str] = []

    def worker(part: list[str]) -> None:
        barrier.wait(T)
        for name in part:
            try:
                added.append(queue.add(cfg(name)))
            except ConfigError:
                refused.append(name)

    threads = [threading.Thread(target=worker, args=(wanted[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert len(added) == 50 and sorted(refused) == sorted(set(wanted))
    assert sorted(names(queue)) == sorted(set(wanted))
    assert len({j.id for j in added}) == 50
    data = check_journal(queue, journal)
    assert len(data["jobs"]) == 50


def test_snapshot_is_json_and_a_copy(queue, fake):
    gate = fake.block("a")
    queue.add(cfg("a"))
    queue.add(cfg("b", mode="iLECO"))
    queue.start()
    assert fake.began("a")
    rows = queue.snapshot()
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows
    rows[0]["state"] = "hacked"
    rows.clear()
    assert states(queue) == {"a": "running", "b": "queued"}
    assert queue.snapshot()[1]["mode"] == "iLECO"
    job = queue.get(queue.snapshot()[1]["id"])
    job.settings["save_lora_name"] = "hacked"
    assert names(queue) == ["a", "b"]
    gate.set()
    assert queue.wait(T)
    json.dumps(queue.snapshot(), allow_nan=False)


def test_close_stops_the_running_job(journal, fake):
    q = JobQueue(journal, fake)
    fake.block("a")
    q.add(cfg("a"))
    q.add(cfg("b"))
    q.start()
    assert fake.began("a")
    assert q.close(T) and not q.running
    assert states(q) == {"a": "stopped", "b": "queued"} and fake.stop_save == {"a": False}


def test_real_training_jobs_run_through_the_queue(tmp_path, logs, journal):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    seen: list[Progress] = []

    def run_job(c, stop, listener):
        return Trainer(c, host, device="cpu", stop=stop, listeners=[listener, seen.append]).run()

    q = JobQueue(journal, run_job)
    q.add(quick_config(data, save_lora_name="first", train_iterations=3))
    q.add(quick_config(tmp_path / "empty", save_lora_name="broken", train_iterations=3))
    q.add(quick_config(data, save_lora_name="second", train_iterations=2))
    assert q.start() and q.wait(60)
    rows = {r["name"]: r for r in q.snapshot()}
    assert {n: r["state"] for n, r in rows.items()} == {"first": "done", "broken": "failed", "second": "done"}
    for name, steps in (("first", 3), ("second", 2)):
        out = tmp_path / "lora" / f"{name}.safetensors"
        assert rows[name]["output"] == str(out) and out.is_file()
        assert rows[name]["message"] == f"saved {out}"
        assert rows[name]["steps"] == steps and (rows[name]["step"], rows[name]["total"]) == (steps, steps)
        assert rows[name]["phase"] == "done" and rows[name]["loss_ema"] is not None
    assert rows["broken"]["message"] and rows["broken"]["output"] is None
    assert {p.name for p in seen if p.phase == "training"} == {"first", "second"}
    check_journal(q, journal)
