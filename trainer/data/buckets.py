"""Aspect-ratio buckets: pure integer math, no images and no torch.

The scheme follows TrainTrain so presets train on the same sizes:

* ``max_pixels = height * width`` of ``image_size``.
* "main" buckets: a square, then for every width ``min_length, min_length+step, ...
  <= max(h, w)`` the height ``min(max(h, w), floor(max_pixels // width / step) * step)``
  together with its transpose, kept while ``1/max_ratio <= width/height <= max_ratio``.
* "sub" buckets: every (width, height) on the same grid (sides ``min_length + k*step``
  up to ``max(h, w)``) within ``max_pixels`` and the ratio limit that is not a main
  bucket. They hold the downscaled copies of ``sub_image_num``.

Differences from TrainTrain, on purpose:

* The square side is ``min(h, w)``; TrainTrain uses ``h``, which is the same when
  ``h <= w`` but would exceed ``max_pixels`` for a portrait ``image_size``.
* A height that floors to 0 (``max_pixels // width < step``) gives no bucket.
* Every side is rounded down to ``multiple`` (the model's pixel multiple) so the U-Net
  accepts it; duplicates are dropped and a rounded bucket that leaves the ratio limit
  is dropped (the square never is).

Buckets are ``(width, height)`` tuples sorted by aspect ratio (then by area).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.params import ConfigError

Bucket = tuple[int, int]

SIZE_KEY = "image_size(height, width)"


@dataclass(frozen=True)
class Buckets:
    """Main buckets (where each image goes) and sub buckets (its smaller copies)."""

    main: list[Bucket]
    sub: list[Bucket]
    max_pixels: int
    max_ratio: float

    @property
    def all(self) -> list[Bucket]:
        return sorted(set(self.main) | set(self.sub), key=_order)


def _order(b: Bucket) -> tuple[float, int]:
    return (b[0] / b[1], b[0] * b[1])


def _in_ratio(w: int, h: int, max_ratio: float) -> bool:
    # long side / short side, one division: w/h against 1/max_ratio rounds differently from h/w
    # against max_ratio, which let a bucket in without its transpose (160x184 at ratio 1.15)
    return h > 0 and w > 0 and max(w, h) / min(w, h) <= max_ratio


def _grid(min_length: int, longest: int, step: int) -> list[int]:
    return list(range(min_length, longest + 1, step))


def _main_raw(h: int, w: int, step: int, min_length: int, max_ratio: float) -> set[Bucket]:
    """TrainTrain's main buckets before rounding to the model's multiple."""
    longest, max_pixels = max(h, w), h * w
    side = min(h, w)
    out: set[Bucket] = {(side, side)}
    for width in _grid(min_length, longest, step):
        height = min(longest, (max_pixels // width) // step * step)
        if _in_ratio(width, height, max_ratio):
            out |= {(width, height), (height, width)}
    return out


def _sub_raw(h: int, w: int, step: int, min_length: int, max_ratio: float) -> set[Bucket]:
    """Every grid bucket within the pixel budget and ratio limit."""
    grid = _grid(min_length, max(h, w), step)
    return {(a, b) for a in grid for b in grid if a * b <= h * w and _in_ratio(a, b, max_ratio)}


def _round(buckets: set[Bucket], multiple: int, max_ratio: float) -> set[Bucket]:
    out = set()
    for w, h in buckets:
        rw, rh = w // multiple * multiple, h // multiple * multiple
        if rw == rh > 0 or _in_ratio(rw, rh, max_ratio):
            out.add((rw, rh))
    return out


def make_buckets(size_hw: list[int] | tuple[int, int], step: int, min_length: int,
                 max_ratio: float, multiple: int = 8) -> Buckets:
    """Main and sub buckets for ``image_size`` ([height, width]) as described above."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if step < 1:
        raise ConfigError("image_buckets_step", step, "must be at least 1")
    if max_ratio < 1:
        raise ConfigError("image_max_ratio", max_ratio, "must be at least 1")
    if min(h, w) < multiple:
        raise ConfigError(SIZE_KEY, list(size_hw), f"each side must be at least the model's multiple {multiple}")
    main = _round(_main_raw(h, w, step, min_length, max_ratio), multiple, max_ratio)
    sub = _round(_sub_raw(h, w, step, min_length, max_ratio), multiple, max_ratio) - main
    return Buckets(sorted(main, key=_order), sorted(sub, key=_order), h * w, max_ratio)


def ratio_distance(width: int, height: int, bucket: Bucket) -> float:
    """How far apart two aspect ratios are, symmetric for portrait and landscape."""
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (log scale); ties go to the larger one."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return min(buckets, key=lambda b: (ratio_distance(width, height, b), -b[0] * b[1]))


def sub_buckets_for(width: int, height: int, main: Bucket, buckets: Buckets, count: int) -> list[Bucket]:
    """Up to ``count`` different sub buckets that fit inside ``main``, nearest ratio first.

    Fitting inside (both sides no larger, smaller area) makes every sub copy a true
    downscale of the main copy, so it never needs more enlarging than the main one.
    """
    if count <= 0:
        return []
    inside = [b for b in buckets.sub
              if b[0] <= main[0] and b[1] <= main[1] and b[0] * b[1] < main[0] * main[1]]
    inside.sort(key=lambda b: (ratio_distance(width, height, b), -b[0] * b[1]))
    return inside[:count]
