"""Open training images as RGB (plus an optional alpha mask) and fit them to a bucket."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config.params import ConfigError
from .scan import DATA_KEY

log = logging.getLogger(__name__)

# Pillow's own default limit for refusing a decompression bomb (2 x MAX_IMAGE_PIXELS).
# Fixed here so a host that lifts Pillow's limit does not lift ours.
MAX_PIXELS = 178_956_970
WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_RESAMPLE = Image.Resampling.LANCZOS


class UnreadableImage(Exception):
    """The file is not an image Pillow can decode (corrupt, truncated, empty)."""


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open and fully decode; bombs are ConfigError, broken files UnreadableImage."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ConfigError(DATA_KEY, str(path), f"image is too large to load safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise UnreadableImage(f"{path}: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ConfigError(DATA_KEY, str(path), f"image has {w}x{h} = {w * h:,} pixels, more than the "
                          f"{max_pixels:,} allowed (decompression-bomb guard)")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        img.close()
        raise UnreadableImage(f"{path}: {exc}") from exc
    return img


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit L.

    Integer modes are taken as 16-bit samples (PNG/TIFF 16-bit open as I;16 or I), so
    they are scaled by 255/65535; Pillow's own convert would clip them to white.
    Float images are clipped to 0..255 as Pillow does.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> tuple[Image.Image, torch.Tensor | None]:
    """RGB image and alpha as a [1, H, W] float mask in 0..1 (None when fully opaque).

    Transparent pixels are composited on white for the RGB.
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _wide_to_l(img)
    elif mode == "P":
        # Palette transparency becomes real alpha only through RGBA.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in _ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        return (img if img.mode == "RGB" else img.convert("RGB")), None
    alpha = img.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return img.convert("RGB"), None
    rgb = Image.new("RGB", img.size, WHITE)
    rgb.paste(img, mask=alpha)
    mask = torch.from_numpy(np.array(alpha, dtype=np.float32) / 255.0).unsqueeze(0)
    return rgb, mask


def load_image(path: Path | str, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, torch.Tensor | None]:
    """Open an image upright (EXIF orientation applied) as RGB, with its alpha mask or None.

    Raises UnreadableImage for a file Pillow cannot decode and ConfigError (naming the
    file) for one over ``max_pixels``.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        try:
            upright = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:  # broken EXIF block: keep the pixels as stored
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, exc)
            upright = img
        rgb, mask = to_rgb(upright)
        # close() below frees the file (GIF/TIFF keep it open) and the source pixels.
        return (rgb.copy() if rgb is img else rgb), mask
    finally:
        img.close()


def load_mask(path: Path | str, size: tuple[int, int], *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A grayscale mask file (white = learn, black = ignore) as [1, H, W] in 0..1 at ``size`` (w, h).

    It is made upright like its image, then resized to the image's size when it differs,
    so it follows the image through bucketing. A file that cannot be read is a
    ConfigError naming it: training with a silently missing mask would learn the wrong area.
    """
    path = Path(path)
    try:
        img = _open(path, max_pixels)
    except UnreadableImage as exc:
        raise ConfigError(DATA_KEY, str(path), f"mask cannot be read ({exc.__cause__ or exc})") from exc
    try:
        gray = ImageOps.exif_transpose(img)
        gray = _wide_to_l(gray) if gray.mode.startswith("I") or gray.mode == "F" else gray.convert("L")
    finally:
        img.close()
    if gray.size != tuple(size):
        if abs(gray.width / gray.height - size[0] / size[1]) > 0.02 * size[0] / size[1]:
            log.warning("%s: mask is %dx%d, its image %dx%d; stretching the mask to fit", path,
                        gray.width, gray.height, *size)
        gray = gray.resize(tuple(size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(gray, dtype=np.float32) / 255.0).unsqueeze(0)


def cover_geometry(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, crop_top, crop_left) for resize-to-cover then centre crop."""
    scale = max(target_w / width, target_h / height)
    rw = max(target_w, round(width * scale))
    rh = max(target_h, round(height * scale))
    return rw, rh, (rh - target_h) // 2, (rw - target_w) // 2


def needs_upscale(width: int, height: int, target_w: int, target_h: int) -> bool:
    """True when covering the target would enlarge the image."""
    return target_w > width or target_h > height


def resize_cover_crop(img: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """Scale so the image covers width x height, centre-crop; returns (image, (crop_top, crop_left)).

    The crop offsets are in the resized image, as SDXL's crop conditioning expects.
    """
    rw, rh, top, left = cover_geometry(img.width, img.height, width, height)
    resized = img if (rw, rh) == img.size else img.resize((rw, rh), _RESAMPLE)
    return resized.crop((left, top, left + width, top + height)), (top, left)


def mask_to_image(mask: torch.Tensor) -> Image.Image:
    """A [1, H, W] float mask as a Pillow "F" image (resizes like the RGB)."""
    return Image.fromarray(mask[0].numpy().astype(np.float32))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float [3, H, W] in -1..1 (the VAE's input range)."""
    arr = np.array(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
