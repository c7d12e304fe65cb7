"""Run the test suite in one virtual environment per host profile: a1111, forge, latest, neo.

    python3 tests/run_profiles.py [PROFILE ...] [-- PYTEST ARGS]

Each venv is built once and reused while the requirement files and install.py are
unchanged: torch first, then the host's pins (requirements/profile-<p>.txt), then
install.py exactly as a WebUI would run it, then the test tools under a freeze of the
venv. Then it checks that nothing the host pins moved, and runs pytest with the
profile's marker selection. Env: TRAINDECK_VENVS (where venvs live),
TRAINDECK_TORCH_INDEX (an extra index for the torch wheel), TRAINDECK_PROFILE_TIMEOUT.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
TORCH_CONSTRAINTS = REQ / "constraints-torch.txt"
MARKER = ".traindeck-complete"
SETUP_REVISION = "1"  # bump when the build steps below change, so old venvs are rebuilt

_spec = importlib.util.spec_from_file_location("traindeck_install", ROOT / "install.py")
install = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = install
_spec.loader.exec_module(install)  # for satisfies()/canonical(): one version-matching rule


@dataclass(frozen=True)
class Profile:
    name: str
    select: tuple[str, ...]  # pytest marker selection
    forbid: tuple[str, ...]  # distributions that must not be installed
    ui: bool = True  # has gradio: also gets the browser-test tools and chromium


PROFILES = {
    "a1111": Profile("a1111", ("-m", "not needs_peft and not needs_zimage"), ("peft",)),
    "forge": Profile("forge", ("-m", "not needs_zimage"), ()),
    "latest": Profile("latest", (), ()),  # also the standalone app's stack (run_ui.py): gradio 5
    "neo": Profile("neo", ("-m", "not ui and not slow and not needs_zimage"), (), ui=False),  # core subset: keeps CI short
}


@dataclass
class Result:
    profile: str
    ok: bool
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    setup_s: float = 0.0
    test_s: float = 0.0
    note: str = ""


class SetupError(RuntimeError):
    """A venv could not be built or a host pin moved."""


def venvs_dir() -> Path:
    value = os.environ.get("TRAINDECK_VENVS")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "traindeck" / "venvs"


def test_requirements(profile: Profile) -> list[Path]:
    return [REQ / "test.txt", *([REQ / "test-ui.txt"] if profile.ui else [])]


def fingerprint(profile: Profile) -> str:
    """A short hash of everything that decides the venv's content."""
    digest = hashlib.sha256(f"{SETUP_REVISION}|{sys.version}|{sys.platform}".encode())
    for path in (REQ / f"profile-{profile.name}.txt", TORCH_CONSTRAINTS, *test_requirements(profile), ROOT / "install.py"):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def child_env() -> dict[str, str]:
    """The caller's environment without what would leak into the venv's behaviour."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "TRAINDECK_PIP", "PIP_REQUIRE_VIRTUALENV"}}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONUNBUFFERED="1")
    return env


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a setup step with its output in the log; show the log's tail when it fails."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        raise SetupError(f"failed ({done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def freeze(python: Path) -> dict[str, str]:
    """{canonical name: version} from pip freeze --all (pip itself included)."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                         check=True, env=child_env()).stdout
    pins = (re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip()) for line in out.splitlines())
    return {install.canonical(m.group(1)): m.group(2) for m in pins if m}


def write_freeze(pins: dict[str, str], path: Path) -> Path:
    path.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())), encoding="utf-8")
    return path


def read_freeze(path: Path) -> dict[str, str]:
    return dict(line.split("==", 1) for line in path.read_text(encoding="utf-8").split())


def run_install_py(python: Path) -> None:
    """install.py inside the venv, as the WebUI runs it; its lines are part of the report."""
    done = subprocess.run([str(python), str(ROOT / "install.py")], check=False, capture_output=True, text=True,
                          cwd=ROOT, env=child_env())
    for line in (done.stdout + done.stderr).splitlines():
        print(f"    {line}", flush=True)
    if done.returncode != 0:
        raise SetupError(f"install.py exited with {done.returncode}")


def build(profile: Profile, venv: Path) -> None:
    """Create the venv from scratch; the marker is written by the caller once the checks pass."""
    for stale in venv.parent.glob(f"{profile.name}-*"):
        if re.fullmatch(rf"{profile.name}-[0-9a-f]{{10}}", stale.name) and stale != venv:
            print(f"  removing the outdated venv {stale}", flush=True)
            shutil.rmtree(stale)
    if venv.exists():
        shutil.rmtree(venv)  # an unfinished build
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, log = venv / "bin" / "python", venv / "setup.log"
    pip = [str(python), "-m", "pip", "install", "-c", str(TORCH_CONSTRAINTS)]
    index = os.environ.get("TRAINDECK_TORCH_INDEX")
    print("  installing torch, then the host pins", flush=True)
    run_logged([*pip, *(["--extra-index-url", index] if index else []), "torch"], log)
    run_logged([*pip, "-r", str(REQ / f"profile-{profile.name}.txt")], log)
    write_freeze(freeze(python), venv / "host-freeze.txt")
    print("  install.py:", flush=True)
    run_install_py(python)
    frozen = write_freeze(freeze(python), venv / "before-tests-freeze.txt")
    print("  test tools (pytest" + (", playwright" if profile.ui else "") + ")", flush=True)
    for req in test_requirements(profile):
        run_logged([*pip, "-c", str(frozen), "-r", str(req)], log)


def profile_pins(profile: Profile) -> list[tuple[str, str]]:
    """[(canonical name, version spec or '')] of requirements/profile-<name>.txt."""
    pins = []
    for line in (REQ / f"profile-{profile.name}.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line.split("#")[0].strip())
        if match:
            pins.append((install.canonical(match.group(1)), match.group(2).strip()))
    return pins


def check_pins(profile: Profile, venv: Path) -> None:
    """Nothing the host had moved; every pin of the profile file holds; forbidden packages are absent."""
    now, host = freeze(venv / "bin" / "python"), read_freeze(venv / "host-freeze.txt")
    problems = [f"{n}: {v} -> {now.get(n, 'removed')}" for n, v in sorted(host.items()) if now.get(n) != v]
    for name, spec in profile_pins(profile):
        if name not in now or (spec and not install.satisfies(now[name], spec)):
            problems.append(f"{name}: {now.get(name, 'missing')} does not satisfy the pin {spec!r}")
    problems += [f"{name} is installed ({now[name]}) but must not be" for name in profile.forbid if name in now]
    if problems:
        raise SetupError("host pins moved:\n    " + "\n    ".join(problems))


@contextmanager
def build_lock(profile: Profile) -> Iterator[None]:
    """One build of a profile's venvs at a time, across processes (run_ui.py, this runner, CI).

    A build removes unfinished and outdated venvs of its profile: without the lock, two
    builds started together would delete each other's work.
    """
    folder = venvs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{profile.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  waiting for another build of the {profile.name} venv to finish ({fh.name})", flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare(profile: Profile) -> Path:
    """The profile's venv, built or reused, with install.py run and the pins checked."""
    with build_lock(profile):
        return _prepare_locked(profile)


def _prepare_locked(profile: Profile) -> Path:
    venv = venvs_dir() / f"{profile.name}-{fingerprint(profile)}"
    if (venv / MARKER).is_file():
        print(f"  reusing {venv}; install.py:", flush=True)
        run_install_py(venv / "bin" / "python")  # a fresh checkout still needs the vocabulary
        check_pins(profile, venv)
        return venv
    print(f"  building {venv}", flush=True)
    build(profile, venv)
    check_pins(profile, venv)
    (venv / MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"), encoding="utf-8")  # last: complete
    return venv


def junit_counts(path: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) from pytest's junit XML; errors count as failures."""
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return total["tests"] - failed - total["skipped"], failed, total["skipped"]


def workers() -> list[str]:
    """pytest-xdist arguments: one worker per CPU this process may use (each runs torch on one thread)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["-n", str(cpus)] if cpus > 1 else []


# pytest's closing line, with or without -q's missing '=' frame: "=== 3 passed, 1 warning in 2.10s ==="
SUMMARY_LINE = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+|no tests ran) in [0-9.]+s(?: \([0-9:]+\))?\s*=*$")
CRASH_MARKS = ("node down:", "crashed while running", "replacing crashed worker", "Maximum crashed workers",
               "PluggyTeardownRaisedWarning", "INTERNALERROR")


def summary_counts(line: str) -> dict[str, int]:
    """{'passed': 3, 'failed': 1, ...} from pytest's closing line."""
    return {word.rstrip("s") if word in ("errors", "warnings") else word: int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|warnings?|xfailed|xpassed)",
                                      line)}


def judge(code: int, lines: list[str], xml: Path) -> tuple[tuple[int, int, int], list[str]]:
    """((passed, failed, skipped), problems) of a finished pytest run.

    A run counts only when pytest printed its closing line, no worker crashed, and the junit
    file is complete and agrees with that line: a dead worker or a killed pytest can leave
    an exit code of 0, no summary, or a junit file that lists only part of the tests.
    """
    problems: list[str] = []
    closing = next((line for line in reversed(lines) if SUMMARY_LINE.match(line.strip())), None)
    if closing is None:
        problems.append("pytest ended without its summary line")
    crashes = [line.strip() for line in lines if any(mark in line for mark in CRASH_MARKS)]
    if crashes:
        problems.append(f"a test worker or pytest itself crashed: {crashes[0][:160]}")
    counts = (0, 0, 0)
    try:
        counts = junit_counts(xml)
    except FileNotFoundError:
        problems.append("the junit file is missing")
    except ET.ParseError as exc:
        problems.append(f"the junit file is incomplete ({exc})")
    if closing is not None and xml.is_file() and not problems:
        said = summary_counts(closing)
        want = (said.get("passed", 0), said.get("failed", 0) + said.get("error", 0), said.get("skipped", 0))
        if want != counts:
            problems.append(f"the junit file lists {counts} (passed, failed, skipped), pytest said {want}")
    if code not in (0, 1) and not problems:
        problems.append(f"pytest exited with {code}")
    return counts, problems


def stream(cmd: list[str], timeout: float) -> tuple[int, list[str], bool]:
    """Run `cmd`, echoing its output and keeping it; (exit code, lines, timed out)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, stop)
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
        code = proc.wait()
    finally:
        timer.cancel()
    sys.stdout.flush()
    return code, lines, fired.is_set()


def run_pytest(profile: Profile, venv: Path, extra: list[str], result: Result) -> None:
    timeout = float(os.environ.get("TRAINDECK_PROFILE_TIMEOUT", "1500"))
    with tempfile.TemporaryDirectory(prefix="traindeck-junit-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [str(venv / "bin" / "python"), "-m", "pytest", *profile.select, *workers(),
               "--durations=10", f"--junitxml={xml}", *extra]  # durations keep slow tests in view
        print(f"  $ {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        code, lines, timed_out = stream(cmd, timeout)
        result.test_s = time.monotonic() - start
        (result.passed, result.failed, result.skipped), problems = judge(code, lines, xml)
    if timed_out:
        problems.insert(0, f"pytest ran past {timeout:.0f} s and was stopped")
    if code == 5 or (code == 0 and result.passed == 0 and not problems):
        problems.append("no test ran")
    result.note = "; ".join(problems)
    result.ok = code == 0 and result.passed > 0 and not problems


def ensure_chromium() -> None:
    """The browser test drives Debian's chromium; install it with apt when it is missing."""
    if any(shutil.which(name) for name in ("chromium", "chromium-browser")):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        print("  chromium is missing and there is no apt-get: the browser test will fail", flush=True)
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print("  installing chromium with apt-get (for the browser test)", flush=True)
    env = {**child_env(), "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, apt, "update", "-qq"], [*sudo, apt, "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"  {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}", flush=True)
            return


def run_profile(profile: Profile, extra: list[str]) -> Result:
    print(f"\n=== profile {profile.name}", flush=True)
    result, start = Result(profile.name, ok=False), time.monotonic()
    try:
        venv = prepare(profile)
    except (SetupError, subprocess.CalledProcessError, OSError) as exc:
        result.setup_s, result.note = time.monotonic() - start, "setup failed"
        print(f"  setup failed: {exc}", flush=True)
        return result
    if profile.ui:
        ensure_chromium()
    result.setup_s = time.monotonic() - start
    run_pytest(profile, venv, extra, result)
    return result


def summary(results: list[Result]) -> None:
    print("\n=== summary", flush=True)
    print(f"{'profile':<8} {'result':<6} {'passed':>6} {'failed':>6} {'skipped':>7} {'setup s':>8} {'tests s':>8}  note")
    for r in results:
        print(f"{r.profile:<8} {'ok' if r.ok else 'FAIL':<6} {r.passed:>6} {r.failed:>6} {r.skipped:>7} "
              f"{r.setup_s:>8.1f} {r.test_s:>8.1f}  {r.note}")
    passed, failed = sum(r.passed for r in results), sum(r.failed for r in results)
    print(f"total: {passed} passed, {failed} failed", flush=True)


def main(argv: list[str]) -> int:
    names, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        print(f"unknown profile(s) {unknown}; choose from {list(PROFILES)}", file=sys.stderr)
        return 2
    results = [run_profile(PROFILES[name], extra) for name in names or list(PROFILES)]
    summary(results)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
