"""The test runner itself: a crash never passes for green, and venv builds take turns."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import run_profiles as rp

GOOD = "================= 3 passed, 1 skipped, 2 warnings in 1.50s ================="


def junit(path: Path, tests: int, failures: int = 0, skipped: int = 0, text: str | None = None) -> Path:
    if text is None:
        suite = ET.Element("testsuite", tests=str(tests), failures=str(failures), errors="0", skipped=str(skipped))
        text = ET.tostring(ET.Element("testsuites"), encoding="unicode").replace(
            "<testsuites />", f"<testsuites>{ET.tostring(suite, encoding='unicode')}</testsuites>")
    path.write_text(text, encoding="utf-8")
    return path


def test_a_complete_run_is_judged_by_its_counts(tmp_path) -> None:
    counts, problems = rp.judge(0, ["x", GOOD], junit(tmp_path / "j.xml", 4, skipped=1))
    assert counts == (3, 0, 1) and problems == []


@pytest.mark.parametrize("lines,problem", [
    (["tests/test_a.py ....", "[gw1] node down: Not properly terminated", GOOD], "crashed"),
    (["E   pluggy.PluggyTeardownRaisedWarning: OSError: cannot send (already closed?)", GOOD], "crashed"),
    (["INTERNALERROR> Traceback", GOOD], "crashed"),
    (["tests/test_a.py ....                [ 65%]"], "without its summary line"),
])
def test_crashes_and_missing_summaries_fail(tmp_path, lines, problem) -> None:
    _, problems = rp.judge(0, lines, junit(tmp_path / "j.xml", 4, skipped=1))
    assert any(problem in p for p in problems), problems


def test_a_missing_or_partial_junit_file_fails(tmp_path) -> None:
    _, problems = rp.judge(0, [GOOD], tmp_path / "absent.xml")
    assert problems == ["the junit file is missing"]
    _, problems = rp.judge(0, [GOOD], junit(tmp_path / "cut.xml", 0, text="<testsuites><testsuite tests='4'"))
    assert problems and "incomplete" in problems[0]
    _, problems = rp.judge(0, [GOOD], junit(tmp_path / "few.xml", 2))  # lists fewer tests than pytest ran
    assert problems and "pytest said (3, 0, 1)" in problems[0]


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")  # this venv's packages
    python.chmod(0o755)
    return venv


def test_a_killed_test_process_fails_its_profile_and_shows_in_the_table(tmp_path, capsys) -> None:
    """A test process killed halfway (as the OOM killer does): a crashed worker, or no summary at all."""
    tests = tmp_path / "killed"
    tests.mkdir()
    (tests / "test_die.py").write_text(textwrap.dedent("""
        import os, signal
        def test_ok():
            pass
        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)
    """), encoding="utf-8")
    result = rp.Result("fake", ok=False)
    profile = rp.Profile("fake", (), ())
    rp.run_pytest(profile, _fake_venv(tmp_path), ["-p", "no:cacheprovider", str(tests)], result)
    assert not result.ok
    shown = "crashed" if rp.workers() else "without its summary line"
    assert shown in result.note, result.note
    rp.summary([result])
    table = capsys.readouterr().out
    assert "FAIL" in table and shown in table


def test_a_passing_run_is_ok(tmp_path) -> None:
    tests = tmp_path / "fine"
    tests.mkdir()
    (tests / "test_fine.py").write_text("def test_one():\n    assert 1 + 1 == 2\n", encoding="utf-8")
    result = rp.Result("fake", ok=False)
    rp.run_pytest(rp.Profile("fake", (), ()), _fake_venv(tmp_path), ["-p", "no:cacheprovider", str(tests)], result)
    assert result.ok and result.passed == 1 and result.note == ""


BUILDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests import run_profiles as rp
log = {log!r}

def build(profile, venv):
    with open(log, "a") as fh:
        fh.write(f"start {{os.getpid()}}\\n")
    venv.mkdir(parents=True)
    time.sleep(1.5)
    with open(log, "a") as fh:
        fh.write(f"end {{os.getpid()}}\\n")

rp.build = build
rp.check_pins = lambda profile, venv: None
rp.run_install_py = lambda python: None
print(rp.prepare(rp.PROFILES["neo"]))
"""


def test_two_builds_started_together_take_turns(tmp_path) -> None:
    log = tmp_path / "builds.log"
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(root=str(rp.ROOT), log=str(log)), encoding="utf-8")
    env = {**os.environ, "TRAINDECK_VENVS": str(tmp_path / "venvs")}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    events = log.read_text(encoding="utf-8").split()
    assert events[0::2] == ["start", "end"]  # one build, whole, and nobody else inside it
    assert len(events) == 4 and outs[0].strip().splitlines()[-1] == outs[1].strip().splitlines()[-1]
    assert any("waiting for another build" in out for out in outs)
