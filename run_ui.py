"""Install what is missing and start the standalone UI:  python3 run_ui.py [--models DIR] [--port N]

On first use it builds a virtual environment with torch 2.13.0 and a known-good set of
libraries (the Forge host's pins: gradio 4.40, diffusers 0.31, transformers 4.46), runs
install.py in it, and then starts `python -m trainer.ui` with the arguments given here.
Later runs reuse the environment. With no model in --models (default ./models) the UI
offers the built-in demo model and images. `--no-venv` starts the UI in the current
Python instead, for an environment that already has torch and gradio.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    if "--no-venv" in argv:
        argv = [a for a in argv if a != "--no-venv"]
        return subprocess.call([sys.executable, "-m", "trainer.ui", *argv], cwd=ROOT)
    sys.path.insert(0, str(ROOT))
    from tests.run_profiles import PROFILES, SetupError, prepare  # the one environment builder

    print("preparing the environment (first run: a few minutes; then it is reused)", flush=True)
    try:
        venv = prepare(PROFILES["forge"])
    except (SetupError, subprocess.CalledProcessError, OSError) as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 1
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.call([str(venv / "bin" / "python"), "-m", "trainer.ui", *argv], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
