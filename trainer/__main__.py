"""python -m trainer: the headless CLI."""
import os
import sys

# Spinning OpenMP waiters make CPU training collapse when other programs share the cores;
# set before torch is imported (an explicit setting in the environment wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
