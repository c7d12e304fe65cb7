"""Cooperative stopping while preparing data (Stop works during caching)."""
from __future__ import annotations

from typing import Callable

from ..training.events import JobStopped


class Stopped(JobStopped):
    """The user asked to stop while data was being prepared."""


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    """Raise Stopped when ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise Stopped("stopped while preparing the dataset")
