"""kill -9 at random moments: saved networks are never partial, the queue journal never corrupt.

Every file is written to a temp file `.<name>.<random>.tmp` next to it and renamed over it
(trainer.fsutil.atomic_path). A kill between the two leaves that temp file behind: it is
harmless, as nothing reads it (A1111, Forge and ComfyUI list `*.safetensors`; the queue reads
`queue.json`), no later write reuses its name, and the next runs below go on beside it.
The random delays are seeded, so a failure replays with the same plan (timing still varies).
"""
from __future__ import annotations

import json
import random
import re
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from trainer.fsutil import write_text_atomic
from trainer.jobs.queue import JobQueue
from trainer.jobs.journal import read_journal

from tests.enginekit import make_images, quick_config
from tests.killkit import kill_and_reap, quick_run, sha256, spawn, target_of, temp_files, wait_for_temp
from tests.ldm_export import write_single_file
from tests.tiny import tiny_bundle

SEED = 20240613
ITERS = 6  # steps of each CLI job: an intermediate save after steps 1..5, the final one after 6
CLI_RUNS = 16  # half killed when a chosen save has begun, half at a random moment of the job's life
JOURNAL_RUNS = 40
DEADLINE = 120.0  # seconds any one child may take before the test gives up on it

Expected = dict[str, tuple[tuple[int, ...], object]]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny SD1 checkpoint in the A1111 single-file layout, with its .yaml."""
    return write_single_file(tiny_bundle("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors")


def cli_args(preset: Path, model: Path, out: Path) -> list[str]:
    """The CLI job: every step saved, the same paths rewritten by every run."""
    sets = [f"train_iterations={ITERS}", "save_per_steps=1", "save_overwrite=true", "save_as_json=true"]
    return ["-m", "trainer", "--preset", str(preset), "--model", str(model), "--lora-dir", str(out), "--quiet",
            *[arg for item in sets for arg in ("--set", item)]]


def check_lora(path: Path, expected: Expected) -> None:
    """`path` is a whole network file: every tensor of the reference, metadata that parses."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
    except SafetensorError as exc:
        pytest.fail(f"{path.name} is not a whole .safetensors file: {exc}")
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == expected, path.name
    json.loads(meta["traindeck_settings"])
    step = re.fullmatch(r"tiny_(\d+)steps\.safetensors", path.name)
    assert int(meta["ss_steps"]) == (int(step[1]) if step else ITERS), path.name


def check_outputs(out: Path, expected: Expected, before: dict[str, str], new_temps: set[str]) -> None:
    """After a kill: every network loads, nothing went missing, and an unfinished save left the old file."""
    present = {p.name: p for p in out.glob("*.safetensors")}
    assert set(before) <= set(present), "a file that existed before the run is gone"
    for path in present.values():
        check_lora(path, expected)
    for name in new_temps:  # killed between creating this temp file and renaming it
        target = out / target_of(name)
        assert (sha256(target) if target.exists() else None) == before.get(target.name), target.name


def check_jsons(folder: Path) -> None:
    """Every settings JSON a run wrote (save_as_json) parses."""
    paths = list(folder.rglob("*.json"))
    assert paths, f"no settings JSON under {folder}"
    for path in paths:
        json.loads(path.read_text(encoding="utf-8"))


def kill_cli_once(args: list[str], tmp: Path, out: Path, plan: tuple[str, float, float], log: Path) -> int:
    """Start the CLI job, kill it as `plan` says, reap it; its return code (0 when it finished first)."""
    how, when, jitter = plan
    known = temp_files(out)
    with log.open("wb") as err:
        proc = spawn(args, tmp, stderr=err)
        try:
            if how == "timed":
                try:
                    proc.wait(when)
                except subprocess.TimeoutExpired:
                    pass
            else:
                name = "tiny" if when >= ITERS else f"tiny_{int(when)}steps"
                if wait_for_temp(proc, out, f".{name}.safetensors.", known, time.monotonic() + DEADLINE):
                    time.sleep(jitter)
        finally:
            rc = kill_and_reap(proc)
    assert rc in (0, -9), f"the CLI job failed ({rc}):\n{log.read_text(errors='replace')}"
    return rc


def reference_run(args: list[str], tmp: Path, out: Path, log: Path) -> tuple[float, float]:
    """Run the job to its end, watching its temp files: (its life, the longest a temp file lived), s."""
    seen: dict[str, list[float]] = {}
    started = time.monotonic()
    with log.open("wb") as err:
        proc = spawn(args, tmp, stderr=err)
        try:
            while proc.poll() is None and time.monotonic() < started + DEADLINE:
                now = time.monotonic()
                for name in temp_files(out):
                    seen.setdefault(name, [now, now])[1] = now
                time.sleep(0.0005)
        finally:
            rc = kill_and_reap(proc)
    assert rc == 0, f"the CLI job failed ({rc}):\n{log.read_text(errors='replace')}"
    assert len(seen) == ITERS, sorted(seen)  # one save per step
    return time.monotonic() - started, max(last - first for first, last in seen.values())


def make_plan(rng: random.Random, i: int, life: float, window: float) -> tuple[str, float, float]:
    """Even runs: kill once the save of a chosen step has begun, anywhere in it; odd ones: at a random time."""
    if i % 2 == 0:  # the final file's save half the time, else one of the intermediate ones
        step = ITERS if rng.random() < 0.5 else rng.randint(1, ITERS - 1)
        return "save", float(step), rng.choice((0.0, rng.uniform(0.0, window * 1.25)))  # at once, or later
    return "timed", rng.uniform(0.0, life * 1.05), 0.0


@pytest.mark.slow
def test_kill_9_while_saving_never_leaves_a_partial_file(tmp_path, model_file):
    preset, out = tmp_path / "job.json", tmp_path / "out"
    preset.write_text(json.dumps(quick_config(make_images(tmp_path / "data")).to_dict()))
    args = cli_args(preset, model_file, out)
    life, window = reference_run(args, tmp_path, out, tmp_path / "first.log")
    reference = load_file(str(out / "tiny.safetensors"))  # the "previous" file of the first kill
    expected = {k: (tuple(v.shape), v.dtype) for k, v in reference.items()}
    rng, tally = random.Random(SEED), Counter()
    for i in range(CLI_RUNS):
        before = {p.name: sha256(p) for p in out.glob("*.safetensors")}
        known = temp_files(out)
        plan = make_plan(rng, i, life, window)
        rc = kill_cli_once(args, tmp_path, out, plan, tmp_path / f"run{i}.log")
        new_temps = temp_files(out) - known
        check_outputs(out, expected, before, new_temps)
        changed = sum(sha256(p) != before.get(p.name) for p in out.glob("*.safetensors"))
        tally.update({f"{plan[0]} runs": 1, f"{plan[0]} kills inside a save": bool(new_temps),
                      "kills inside the final save": any(target_of(n) == "tiny.safetensors" for n in new_temps),
                      "finished before the kill": rc == 0, "files replaced": changed})
    check_jsons(tmp_path / "jsons")
    # The temp files left behind do not stand in the way of the next job.
    assert kill_cli_once(args, tmp_path, out, ("timed", DEADLINE, 0.0), tmp_path / "last.log") == 0
    check_outputs(out, expected, {}, set())
    print(f"\nCLI kill -9: job life {life:.1f} s, a save {window * 1000:.0f} ms, {dict(tally)}, "
          f"{len(temp_files(out))} temp files left")
    # The runs did hit saves, the final file's too, not only the time around them.
    assert tally["save kills inside a save"] >= 1 and tally["kills inside the final save"] >= 1, tally


def check_journal(journal: Path) -> int:
    """The journal parses, every job loads, and a restarted queue lists the same jobs; how many."""
    jobs = read_journal(journal)  # OSError or ValueError when it is not a whole journal
    assert len({job.id for job in jobs}) == len(jobs)
    for job in jobs:
        job.config()
    queue = JobQueue(journal, quick_run)
    try:
        rows = queue.snapshot()
        assert [r["id"] for r in rows] == [job.id for job in jobs]
        assert [r["state"] for r in rows] == ["interrupted" if j.state == "running" else j.state for j in jobs]
        assert not list(journal.parent.glob("*.corrupt-*")), "the restarted queue set the journal aside"
    finally:
        assert queue.close(5.0)
    return len(jobs)


@pytest.mark.slow
def test_kill_9_never_corrupts_the_queue_journal(tmp_path):
    rng, tally = random.Random(SEED), Counter()
    shared = tmp_path / "cache" / "queue.json"
    for i in range(JOURNAL_RUNS):
        fresh = i % 5 == 0  # a new journal, killed early: maybe before its first write
        journal = tmp_path / f"fresh{i}" / "queue.json" if fresh else shared
        existed, known = journal.exists(), temp_files(journal.parent)
        log = tmp_path / f"churn{i}.log"
        with log.open("wb") as err:
            proc = spawn(["-m", "tests.killkit", "churn", str(journal), str(i)], tmp_path, stderr=err)
            try:
                proc.wait(rng.uniform(0.0, 0.15) if fresh else rng.uniform(0.02, 0.4))
            except subprocess.TimeoutExpired:
                pass
            finally:
                rc = kill_and_reap(proc)
        assert rc == -9, f"the churn child ended by itself ({rc}):\n{log.read_text(errors='replace')}"
        tally["kills inside a write"] += bool(temp_files(journal.parent) - known)
        if not journal.exists():
            assert not existed, "the journal disappeared"
            tally["kills before the first write"] += 1
            continue
        tally["jobs checked"] += check_journal(journal)
    print(f"\njournal kill -9: {JOURNAL_RUNS} runs, {dict(tally)}")
    assert tally["jobs checked"] > 0


def wait_until_running(journal: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Poll the journal until it says a job is running (the child must still be alive)."""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the hold child ended ({proc.returncode})"
        try:
            if any(job.state == "running" for job in read_journal(journal)):
                return
        except FileNotFoundError:
            pass  # not written yet
        time.sleep(0.01)
    pytest.fail("the journal never showed a running job")


@pytest.mark.slow
def test_a_job_running_at_kill_9_is_interrupted_after_restart(tmp_path):
    journal = tmp_path / "cache" / "queue.json"
    proc = spawn(["-m", "tests.killkit", "hold", str(journal)], tmp_path)
    try:
        wait_until_running(journal, proc, time.monotonic() + 30.0)
    finally:
        assert kill_and_reap(proc) == -9
    assert [(j.name, j.state) for j in read_journal(journal)] == [("held", "running"), ("after", "queued")]
    queue = JobQueue(journal, quick_run)
    try:
        rows = queue.snapshot()
        assert [(r["name"], r["state"]) for r in rows] == [("held", "interrupted"), ("after", "queued")]
        assert "interrupted" in rows[0]["message"] and not queue.running  # nothing runs before start()
        assert [j.state for j in read_journal(journal)] == ["interrupted", "queued"]  # journaled at once
    finally:
        assert queue.close(5.0)


def test_an_atomic_write_gets_the_permissions_of_a_plain_write(tmp_path):
    """A new file is 0o666 less the umask, as open() makes it; a replaced file keeps its mode.

    os.replace keeps the temp file's mode: one from tempfile.mkstemp (0o600) made every saved
    LoRA unreadable to a WebUI or a file server running as another user.
    """
    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x", encoding="utf-8")
    default = stat.S_IMODE(plain.stat().st_mode)
    write_text_atomic(atomic, "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == default
    plain.chmod(0o640)
    write_text_atomic(plain, "y")
    assert stat.S_IMODE(plain.stat().st_mode) == 0o640 and plain.read_text(encoding="utf-8") == "y"
