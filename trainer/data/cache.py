"""Latent cache: every image variant goes through the VAE once, before training.

Latents are the mean of the VAE's posterior, ``(mean - vae_shift) * vae_scale``, not a
random sample: the posterior's spread is tiny, and the mean makes the cache the same
whatever the batching, order or seed (so a cached latent equals a direct encode).
They are stored as float32 on ``store_device`` (the CPU by default).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..training.devices import compute_dtype
from ..config.params import ConfigError
from .buckets import Bucket, Buckets, make_buckets
from .images import UnreadableImage, load_image, load_mask, needs_upscale
from .scan import DATA_KEY, ImageItem, mask_file
from .stop import check_stop
from .variants import Pixels, Sample, mask_at, plan_variants, render_variant

log = logging.getLogger(__name__)

Progress = Callable[[int, int], Any]
MIN_SIDE = 8  # pixels: one latent cell of the SD VAEs; a smaller image holds nothing to learn from


@dataclass
class LatentDataset:
    """Cached samples (one per variant) and what was left out."""

    samples: list[Sample]
    buckets: Buckets
    images: int = 0  # source images that gave samples
    skipped: list[Path] = field(default_factory=list)  # unreadable files, and those in too_small
    too_small: list[Path] = field(default_factory=list)  # a side under MIN_SIDE pixels
    not_upscaled: list[Path] = field(default_factory=list)  # left out by image_disable_upscale

    def __len__(self) -> int:
        return len(self.samples)

    def bucket_indices(self) -> dict[Bucket, list[int]]:
        """Sample indices per bucket, buckets in aspect-ratio order."""
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            groups[s.bucket].append(i)
        return {b: groups[b] for b in sorted(groups, key=lambda b: (b[0] / b[1], b[0] * b[1]))}

    @property
    def captions(self) -> list[str]:
        """Distinct captions in first-seen order (for warming a text cache)."""
        return list(dict.fromkeys(s.caption for s in self.samples))


@contextlib.contextmanager
def vae_for_encoding(vae: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The VAE on ``device`` in ``dtype``, leaving the caller's VAE as it was afterwards.

    Moving in place and back is exact when the dtype stays or widens to fp32; a
    narrowing cast (fp32 -> bf16, fp16 <-> bf16) would lose precision in a VAE the host
    may still use, so then a copy is cast instead.
    """
    param = next(vae.parameters())
    orig_device, orig_dtype = param.device, param.dtype
    if (orig_device, orig_dtype) == (device, dtype):
        yield vae
        return
    if dtype not in (orig_dtype, torch.float32):
        yield copy.deepcopy(vae).to(device=device, dtype=dtype)
        return
    vae.to(device=device, dtype=dtype)
    try:
        yield vae
    finally:
        vae.to(device=orig_device, dtype=orig_dtype)


@dataclass
class PendingImage:
    item: ImageItem
    size: tuple[int, int]  # original (height, width)
    variant_sub: int
    mirrored: bool
    pixels: Pixels
    index: int = -1  # order of arrival, so the dataset order does not depend on batching


class LatentEncoder:
    """Collects rendered variants per bucket and encodes them in small batches."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype, scale: float, shift: float,
                 batch: int, store_device: torch.device, precision: str):
        self.vae, self.device, self.dtype = vae, device, dtype
        self.scale, self.shift, self.batch = scale, shift, max(1, batch)
        self.store_device, self.precision = store_device, precision
        self.pending: dict[Bucket, list[PendingImage]] = defaultdict(list)
        self.done: dict[int, Sample] = {}
        self.count = 0

    def add(self, bucket: Bucket, entry: PendingImage) -> None:
        entry.index, self.count = self.count, self.count + 1
        self.pending[bucket].append(entry)
        if len(self.pending[bucket]) >= self.batch:
            self.flush(bucket)

    def flush_all(self) -> None:
        for bucket in list(self.pending):
            self.flush(bucket)

    @torch.no_grad()
    def flush(self, bucket: Bucket) -> None:
        entries = self.pending.pop(bucket, [])
        if not entries:
            return
        x = torch.stack([e.pixels.tensor for e in entries]).to(device=self.device, dtype=self.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        if self.shift:
            latents = latents - self.shift
        latents = (latents * self.scale).to(device=self.store_device, dtype=torch.float32)
        if not torch.isfinite(latents).all():
            raise ConfigError("train_VAE_precision", self.precision,
                              "the VAE produced NaN/inf latents; use fp32 (or bf16)")
        for entry, latent in zip(entries, latents):
            mask = mask_at(entry.pixels.mask, tuple(latent.shape[-2:]))
            self.done[entry.index] = Sample(
                latent=latent.clone(), caption=entry.item.caption, bucket=bucket,
                original_size=entry.size, crop_top_left=entry.pixels.crop_top_left,
                mask=mask.to(self.store_device) if mask is not None else None,
                source=entry.item.path, sub_index=entry.variant_sub, mirrored=entry.mirrored,
            )


def _data_folder(items: Sequence[ImageItem]) -> str:
    paths = [str(i.path.parent) for i in items]
    return os.path.commonpath(paths) if paths else ""


def build_latent_dataset(items: Sequence[ImageItem], cfg: Any, bundle: Any, *, device: torch.device | str,
                         multiple: int | None = None, progress: Progress | None = None,
                         should_stop: Callable[[], bool] | None = None,
                         store_device: torch.device | str = "cpu", encode_batch: int = 4) -> LatentDataset:
    """Load, bucket, render and VAE-encode every variant of every image, once.

    ``cfg`` supplies image_size, image_buckets_step, image_min_length, image_max_ratio,
    sub_image_num, image_mirroring, image_disable_upscale, train_VAE_precision and
    masked_loss (then a ``<stem>_mask.png`` next to an image replaces its alpha as the mask).
    ``multiple`` defaults to ``bundle.latent_multiple``. ``progress(done, total)`` is
    called after each image, ``should_stop()`` before each (raising Stopped).
    Unreadable images are skipped with a warning; ConfigError when none remain.
    """
    device, store = torch.device(device), torch.device(store_device)
    mult = int(multiple if multiple is not None else bundle.latent_multiple)
    buckets = make_buckets(cfg.image_size, cfg.image_buckets_step, cfg.image_min_length, cfg.image_max_ratio, mult)
    dtype = compute_dtype(cfg.train_VAE_precision, device)
    data = LatentDataset([], buckets)
    with vae_for_encoding(bundle.vae, device, dtype) as vae:
        enc = LatentEncoder(vae, device, dtype, bundle.vae_scale, bundle.vae_shift, encode_batch, store,
                       cfg.train_VAE_precision)
        for n, item in enumerate(items):
            check_stop(should_stop)
            if _add_image(enc, item, cfg, buckets, data):
                data.images += 1
            if progress is not None:
                progress(n + 1, len(items))
        check_stop(should_stop)
        enc.flush_all()
    data.samples = [enc.done[i] for i in sorted(enc.done)]
    if not data.samples:
        left_out = [*data.skipped, *data.not_upscaled]
        first = f" (first: {left_out[0]})" if left_out else ""
        raise ConfigError(DATA_KEY, getattr(cfg, DATA_KEY, "") or _data_folder(items),
                          f"no usable images: {len(data.skipped) - len(data.too_small)} unreadable, "
                          f"{len(data.too_small)} under {MIN_SIDE} px on a side, {len(data.not_upscaled)} "
                          f"smaller than their bucket with image_disable_upscale on{first}")
    if cfg.masked_loss and all(s.mask is None for s in data.samples):
        log.warning("masked_loss is on but no image has transparency or a _mask.png: the loss is not weighted")
    log.info("cached %d latents from %d images (%d unreadable, %d not upscaled)", len(data.samples),
             data.images, len(data.skipped), len(data.not_upscaled))
    return data


def _add_image(enc: LatentEncoder, item: ImageItem, cfg: Any, buckets: Buckets, data: LatentDataset) -> bool:
    """Queue every variant of one image; False when the image is left out."""
    try:
        rgb, mask = load_image(item.path)
    except UnreadableImage as exc:
        log.warning("skipping unreadable image %s (%s)", item.path, exc.__cause__ or exc)
        data.skipped.append(item.path)
        return False
    found = mask_file(item.path) if cfg.masked_loss else None
    if found is not None:
        mask = load_mask(found, rgb.size)
    if min(rgb.size) < MIN_SIDE:
        log.warning("skipping %s: %dx%d has a side under %d pixels", item.path, rgb.width, rgb.height, MIN_SIDE)
        data.skipped.append(item.path)
        data.too_small.append(item.path)
        return False
    variants = plan_variants(rgb.width, rgb.height, buckets, cfg.sub_image_num, cfg.image_mirroring)
    main = variants[0].bucket
    if cfg.image_disable_upscale and needs_upscale(rgb.width, rgb.height, *main):
        log.warning("skipping %s: %dx%d is smaller than its bucket %dx%d and image_disable_upscale is on",
                    item.path, rgb.width, rgb.height, *main)
        data.not_upscaled.append(item.path)
        return False
    for v in variants:
        pixels = render_variant(rgb, mask, v)
        enc.add(v.bucket, PendingImage(item, (rgb.height, rgb.width), v.sub_index, v.mirrored, pixels))
    return True
