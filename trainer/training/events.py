"""Progress events and the stop request shared by the engine, UI, queue and CLI."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

PHASES = ("queued", "loading", "caching", "training", "saving", "done", "stopped", "failed")


@dataclass
class Progress:
    """A snapshot of one job, sent to listeners after each step and phase change."""

    phase: str = "queued"
    mode: str = ""
    name: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_ema: float | None = None
    lrs: list[float] = field(default_factory=list)
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    pass_index: int = 1
    pass_count: int = 1
    samples: list[str] = field(default_factory=list)  # the newest sample images of the job

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[Progress], None]


class StopFlag:
    """Ask a running job to stop, with or without saving what it has.

    An Event rather than a global so each job (and test) has its own.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._save = False

    def request(self, save: bool = False) -> None:
        self._save = self._save or save
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def save(self) -> bool:
        return self._save

    def reset(self) -> None:
        self._save = False
        self._event.clear()


class JobStopped(Exception):
    """Raised inside the engine when a stop was requested."""
