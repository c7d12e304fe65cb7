"""Find training images (recursively) and read their captions."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config.params import ConfigError

log = logging.getLogger(__name__)

DATA_KEY = "lora_data_directory"
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp", ".pcx", ".ico",
)
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")  # first found wins
MASK_SUFFIX = "_mask.png"  # <stem>_mask.png is the loss mask of <stem>.<ext>, never a training image
_ID_MARK = "_id_"


@dataclass(frozen=True)
class ImageItem:
    """One image file and its final caption (trigger word already applied)."""

    path: Path
    caption: str


def _clean(text: str) -> str:
    """Collapse all whitespace (newlines, tabs, runs of spaces) to single spaces."""
    return " ".join(text.split())


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(DATA_KEY, str(path), f"cannot read caption file: {exc}") from exc
    try:
        return raw.decode("utf-8-sig")  # a BOM (Windows editors) is allowed and dropped
    except UnicodeDecodeError as exc:
        raise ConfigError(DATA_KEY, str(path), f"caption file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from exc


def filename_caption(image_path: Path | str) -> str:
    """The file name as tags: stem without a trailing ``_id_...`` part, ``_`` separating tags.

    Tags are joined with ", " (TrainTrain writes ","; the CLIP tokens are the same).
    """
    stem = Path(image_path).stem
    cut = stem.rfind(_ID_MARK)
    if cut >= 0:
        stem = stem[:cut]
    return ", ".join(t for t in (_clean(part) for part in stem.split("_")) if t)


def _starts_with(caption: str, trigger: str) -> bool:
    """True when the caption's first word(s) are the trigger (not merely a prefix of a word)."""
    if not caption.startswith(trigger):
        return False
    return len(caption) == len(trigger) or not caption[len(trigger)].isalnum()


def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first, joined with ", ", unless the caption already starts with it."""
    caption, trigger = _clean(caption), _clean(trigger)
    if not trigger:
        return caption
    if not caption:
        return trigger
    if _starts_with(caption, trigger):
        return caption
    return f"{trigger}, {caption}"


def caption_file(image_path: Path | str) -> Path | None:
    """The same-name ``.txt``, else ``.caption``, else None."""
    path = Path(image_path)
    for ext in CAPTION_EXTENSIONS:
        candidate = path.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption(image_path: Path | str, *, trigger: str = "", use_filename: bool = False) -> str:
    """Caption of one image: caption file, else the file name (if asked), with the trigger first."""
    found = caption_file(image_path)
    if found is not None:
        text = _read_text(found)
    elif use_filename:
        text = filename_caption(image_path)
    else:
        text = ""
    return apply_trigger(text, trigger)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_mask_file(name: str) -> bool:
    """True for a loss-mask file name (``*_mask.png``, any case)."""
    return name.lower().endswith(MASK_SUFFIX)


def mask_file(image_path: Path | str) -> Path | None:
    """The image's ``<stem>_mask.png`` (also ``_mask.PNG`` / ``_MASK.PNG``), else None."""
    path = Path(image_path)
    for suffix in (MASK_SUFFIX, "_mask.PNG", MASK_SUFFIX.upper()):
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _unlistable(exc: OSError) -> None:
    """os.walk's error hook: a folder that cannot be listed is an error, not silently empty."""
    raise ConfigError(DATA_KEY, str(exc.filename), f"folder cannot be read: {exc.strerror or exc}") from exc


def find_images(folder: Path | str, *, keep_masks: bool = False) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files and folders skipped), sorted.

    Extensions match case-insensitively. Links to folders are not followed (no loops).
    Loss masks (``*_mask.png``) are not training images and are left out, unless
    ``keep_masks`` (for callers that give such names another meaning).
    Order is by path relative to ``folder`` so it is the same on every machine.
    """
    root = Path(folder)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unlistable):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if _is_hidden(name) or (is_mask_file(name) and not keep_masks):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def scan_images(folder: Path | str, *, trigger: str = "", use_filename: bool = False,
                keep_masks: bool = False) -> list[ImageItem]:
    """Every image under ``folder`` with its caption; ConfigError when there is nothing to train on.

    ``keep_masks`` also lists ``*_mask.png`` files (see find_images).
    """
    text = str(folder).strip() if folder is not None else ""
    if not text:
        raise ConfigError(DATA_KEY, folder, "no image folder given")
    root = Path(text).expanduser()
    if not root.exists():
        raise ConfigError(DATA_KEY, text, "folder does not exist")
    if not root.is_dir():
        raise ConfigError(DATA_KEY, text, "is not a folder")
    paths = find_images(root, keep_masks=keep_masks)
    if not paths:
        exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise ConfigError(DATA_KEY, text, f"folder has no images ({exts}), also searching subfolders")
    items = [ImageItem(p, read_caption(p, trigger=trigger, use_filename=use_filename)) for p in paths]
    log.info("found %d images in %s", len(items), root)
    return items
