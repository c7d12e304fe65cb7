"""File-system helpers: safe names, atomic writes, never overwriting by accident."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config.params import ConfigError

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_BAD_CHARS = set('<>:"/\\|?*') | {chr(i) for i in range(32)}


def check_name(field: str, name: str) -> str:
    """Refuse a file name that is empty, a path, hidden, or reserved on Windows."""
    if not name or not name.strip():
        raise ConfigError(field, name, "is empty")
    if name in (".", "..") or name.startswith("."):
        raise ConfigError(field, name, "must not start with '.'")
    bad = sorted({c for c in name if c in _BAD_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ConfigError(field, name, f"must be a plain file name without {shown}")
    if name.split(".")[0].strip().lower() in _RESERVED:
        raise ConfigError(field, name, "is a reserved device name")
    if name != name.strip() or name.endswith("."):
        raise ConfigError(field, name, "must not start or end with a space or end with '.'")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise ConfigError(field, name, f"contains an invalid character at position {exc.start}") from None
    if size > 200:
        raise ConfigError(field, name, "is longer than 200 bytes")
    return name


def inside(root: Path | str, path: Path | str) -> bool:
    """True when `path`, with links resolved, lies inside `root`."""
    root_r = Path(root).resolve()
    path_r = Path(path).resolve()
    return path_r == root_r or root_r in path_r.parents


@contextmanager
def atomic_path(final: Path | str, overwrite: bool = False, field: str = "output") -> Iterator[Path]:
    """Yield a temp path next to `final`; rename it over `final` on success.

    A crash leaves either the old file or the new one at `final`, never a part.
    Without `overwrite`, an existing `final` is refused before anything is written.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{field}: {final} already exists; set save_overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(final)
    try:
        if final.exists():  # a replaced file keeps its permissions
            shutil.copymode(final, tmp)
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        # Some writers replace the file they are given (safetensors 0.8's save_file creates its
        # own, 0600): the mode decided above is put back whatever the writer did.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)
        if not overwrite and final.exists():
            raise FileExistsError(f"{field}: {final} appeared while writing; not replaced")
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_temp(final: Path) -> Path:
    """Create an empty `.<name>.<random>.tmp` next to `final`.

    Mode 0o666 less the umask, as a plain open() gives: os.replace keeps the temp file's mode, and
    tempfile.mkstemp's 0o600 would leave a new file other users (a WebUI, a file server) cannot read.
    """
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temp file name next to {final}")


def plain_write_mode(folder: Path) -> int:
    """The mode a plain open() gives a new file in `folder` (0o666 less the umask), from a probe file.

    Reading the umask with os.umask would change it for every thread for a moment.
    """
    probe = _new_temp(Path(folder) / "mode-probe")
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        probe.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str, overwrite: bool = True) -> Path:
    """Write a whole text file atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: Path | str, data: Any, overwrite: bool = True) -> Path:
    """Write JSON (indented, UTF-8) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=4, ensure_ascii=False) + "\n", overwrite)


def unique_path(path: Path | str) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`… when it already exists."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate
