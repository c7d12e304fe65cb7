"""The Plot tab's figure: raw and smoothed loss, and the learning rate(s) on a second axis.

Logs are picked by name inside the logs folder only: an absolute path, ``..`` or any
name that resolves outside it is refused. Figures are plain ``matplotlib.figure.Figure``
objects (no pyplot state), so worker threads can draw them safely.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from matplotlib.figure import Figure

from ..fsutil import atomic_path, inside
from ..config.params import ConfigError
from ..paths import logs_dir
from .runlog import RAW, read_log

LOG_KEY = "log"


def log_names(root: Path | None = None) -> list[str]:
    """CSV logs under the logs folder as 'YYYYMMDD/name.csv', newest first."""
    base = Path(root or logs_dir())
    if not base.is_dir():
        return []
    files = [p for p in base.rglob("*.csv") if p.is_file()]
    files.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    return [p.relative_to(base).as_posix() for p in files]


def resolve_log(name: str, root: Path | None = None) -> Path:
    """The log file of `name`, which must be a relative name inside the logs folder."""
    base = Path(root or logs_dir()).resolve()
    text = (name or "").strip()
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":") or ".." in parts:
        raise ConfigError(LOG_KEY, name, "give a log name inside the logs folder, e.g. 20260101/name-20260101_120000.csv")
    if not text.lower().endswith(".csv"):
        raise ConfigError(LOG_KEY, name, "is not a .csv log")
    path = (base / Path(*parts)).resolve()
    if not inside(base, path):
        raise ConfigError(LOG_KEY, name, "resolves outside the logs folder")
    if not path.is_file():
        raise ConfigError(LOG_KEY, name, "no such log")
    return path


def latest_log(root: Path | None = None) -> Path | None:
    names = log_names(root)
    return Path(root or logs_dir()) / names[0] if names else None


def loss_figure(path: Path, *, size: tuple[float, float] = (8.0, 4.5)) -> Figure:
    """Raw loss (faint), smoothed loss and learning rate(s) against step."""
    header, frame = read_log(path)
    return figure_of(header, frame, path.stem, size=size)


def figure_of(header: dict[str, str], frame, title: str, *, size: tuple[float, float] = (8.0, 4.5)) -> Figure:
    """The figure for an already-read log (header, pandas frame)."""
    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if RAW in frame:
        ax.plot(frame["Step"], frame[RAW], color="tab:blue", alpha=0.3, linewidth=0.8, label="raw loss")
    ax.plot(frame["Step"], frame["Loss"], color="tab:blue", linewidth=1.6, label="smoothed loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_cols = [c for c in frame.columns if c.startswith("Learning Rate")]
    names = lr_labels(header, lr_cols)
    lr_ax = ax.twinx()
    for i, (col, name) in enumerate(zip(lr_cols, names)):
        lr_ax.plot(frame["Step"], frame[col], color=("tab:orange", "tab:green", "tab:red")[i % 3],
                   linestyle="--", linewidth=1.0, label=name)
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small")
    ax.set_title(f"{header.get('save_lora_name', title)}  ({len(frame)} steps)")
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    return fig


def lr_labels(header: dict[str, str], lr_cols: list[str]) -> list[str]:
    """Legend names of the LR columns: their optimizer groups when the log's header names them.

    TrainTrain's logs and older ones have no ``lr_groups`` row, nor does a header whose count
    does not match; their columns keep the generic name.
    """
    groups = [g for g in header.get("lr_groups", "").split(";") if g]
    if len(groups) == len(lr_cols):
        return [f"lr {g}" for g in groups]
    return [c.lower() for c in lr_cols]


def save_png(fig: Figure, path: Path, overwrite: bool = False) -> Path:
    """Write the figure as PNG atomically; an existing file is kept unless `overwrite`."""
    with atomic_path(path, overwrite=overwrite, field="plot") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
