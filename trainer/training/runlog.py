"""CSV training logs in TrainTrain's layout (key,value rows, then Step,Loss,LR...).

Loss is the EMA (α = 0.1) TrainTrain shows; "Raw Loss" is appended last so
TrainTrain's own plot still finds Step and Loss in the first two columns.
The header's "ema_decay" row says whether the saved files hold EMA weights (0: raw
weights); a resumed run adds "resumed_from_step" and its rows start at that step + 1.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Sequence

from ..paths import logs_dir

HEADER_KEYS = ("network_rank", "network_alpha", "train_learning_rate", "train_iterations",
               "train_lr_scheduler", "model_version", "train_optimizer", "save_lora_name", "ema_decay")
RAW = "Raw Loss"


def log_path(name: str, when: float | None = None, suffix: str = "", root: Path | None = None) -> Path:
    """logs/YYYYMMDD/<name>-YYYYMMDD_HHMMSS<suffix>.csv"""
    stamp = time.localtime(when if when is not None else time.time())
    day, full = time.strftime("%Y%m%d", stamp), time.strftime("%Y%m%d_%H%M%S", stamp)
    return (root or logs_dir()) / day / f"{name}-{full}{suffix}.csv"


def lr_columns(n: int) -> list[str]:
    return [f"Learning Rate {i + 1}" for i in range(n)]


class CsvLog:
    """Appends one row per step; flushed each row so a live plot sees it."""

    def __init__(self, path: Path, header: dict[str, Any], n_lrs: int, extra: Sequence[str] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: io.TextIOWrapper | None = open(self.path, "x", newline="", encoding="utf-8")
        self._w = csv.writer(self._fh)
        for key, value in header.items():
            self._w.writerow([key, value])
        self.columns = ["Step", "Loss", *lr_columns(n_lrs), RAW, *extra]
        self._w.writerow(self.columns)
        self._fh.flush()

    def row(self, step: int, loss_ema: float, lrs: Sequence[float], raw: float, *extra: Any) -> None:
        if self._fh is None:
            raise ValueError(f"log {self.path} is closed")
        self._w.writerow([step, f"{loss_ema:.8g}", *(f"{lr:.6g}" for lr in lrs), f"{raw:.8g}", *extra])
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """The key,value rows before the Step header, and that header's line index."""
    header: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if row and row[0] == "Step":
                return header, i
            if len(row) >= 2:
                header[row[0]] = row[1]
    raise ValueError(f"{path} has no 'Step' header row; not a training log")


def read_log(path: Path):
    """(header dict, pandas DataFrame of the step rows)."""
    import pandas as pd

    header, skip = read_header(Path(path))
    frame = pd.read_csv(path, skiprows=skip)
    return header, frame
