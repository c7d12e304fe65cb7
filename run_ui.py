"""Install what is missing and start the standalone UI:  python3 run_ui.py [--models DIR] [--port N]

On first use it builds a virtual environment with torch 2.13.0 and a current stack (the
`latest` test profile, requirements/profile-latest.txt: gradio 5, diffusers 0.42 with Z-Image,
transformers 5 with Qwen3), runs install.py in it, and then starts `python -m trainer.ui`
with the arguments given here. Later runs reuse the environment. With no model in --models (default ./models) the UI
offers the built-in demo model and images. `--no-venv` starts the UI in the current
Python instead, for an environment that already has torch and gradio. Ctrl+C stops it.

The build prints a line per stage and, while a stage runs, every HEARTBEAT_S seconds how
long it has been running and the last line of its log (setup.log in the environment's folder).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
HEARTBEAT_S = 15.0
# The test profile whose environment the app runs in: one requirements file for both, so the
# stack the tests pass on is the stack the app installs (requirements/profile-latest.txt).
PROFILE = "latest"


def last_line(log: Path) -> str:
    """The last non-empty line of the build log (what pip is doing now), shortened."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:  # not written yet
        return ""
    return lines[-1][:120] if lines else ""


class Heartbeat:
    """Prints elapsed time and the log's last line every `every` seconds until stopped."""

    def __init__(self, log: Path, every: float = HEARTBEAT_S):
        self.log, self.every = log, every
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run_ui-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            elapsed = int(time.monotonic() - self.started)
            doing = last_line(self.log)
            print(f"  ... {elapsed // 60}m{elapsed % 60:02d}s" + (f": {doing}" if doing else ""), flush=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def prepare_env() -> Path:
    """The app's environment (the PROFILE test profile), built on first use with a line per stage."""
    sys.path.insert(0, str(ROOT))
    from tests.run_profiles import MARKER, PROFILES, fingerprint, prepare, venvs_dir  # the one environment builder

    profile = PROFILES[PROFILE]
    venv = venvs_dir() / f"{profile.name}-{fingerprint(profile)}"
    log = venv / "setup.log"
    if (venv / MARKER).is_file():
        print(f"using the environment in {venv}", flush=True)
    else:
        print(f"first run: building the environment in {venv}\n"
              f"  this downloads about 1 GB and takes several minutes (about 5 on 2 cores);\n"
              f"  every step is logged to {log}", flush=True)
    started = time.monotonic()
    with Heartbeat(log, HEARTBEAT_S):
        venv = prepare(profile)
    print(f"environment ready ({time.monotonic() - started:.0f} s)", flush=True)
    return venv


def main(argv: list[str]) -> int:
    if "--no-venv" in argv:
        argv = [a for a in argv if a != "--no-venv"]
        return subprocess.call([sys.executable, "-m", "trainer.ui", *argv], cwd=ROOT)
    from tests.run_profiles import SetupError

    try:
        venv = prepare_env()
    except (SetupError, subprocess.CalledProcessError, OSError) as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 1
    print("starting the UI (loading torch and gradio takes a few seconds; Ctrl+C stops it)", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        return subprocess.call([str(venv / "bin" / "python"), "-m", "trainer.ui", *argv], cwd=ROOT, env=env)
    except KeyboardInterrupt:  # the UI got the same Ctrl+C and stops itself
        return 130


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
