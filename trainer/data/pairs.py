"""Image pairs for the difference modes, VAE-encoded once before training.

* Difference and ADDifT train on one pair: ``diff_original_image`` and
  ``diff_target_image``, which must be the same size. They train at that size,
  centre-cropped down to the model's pixel multiple.
* Multi-ADDifT pairs every ``x.<ext>`` of ``lora_data_directory`` with
  ``x<diff_target_name>.<ext>`` beside it, bucketed like LoRA mode (sub images and
  mirroring included). Both images of a pair always get the same bucket, crop and
  flip, so their latents line up pixel for pixel.

Each pair also carries its change mask: 1 on every latent cell where some pixel's
summed |R-G-B| difference between the two images exceeds ``MASK_THRESHOLD``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..training.devices import compute_dtype
from ..config.params import ConfigError
from .batches import Batch, BucketBatches, collate_samples
from .buckets import Bucket, Buckets, make_buckets
from .cache import LatentDataset, LatentEncoder, PendingImage, vae_for_encoding
from .images import MAX_PIXELS, UnreadableImage, load_image
from .scan import DATA_KEY, ImageItem, scan_images
from .stop import check_stop
from .variants import Sample, Variant, plan_variants, render_variant

log = logging.getLogger(__name__)

ORIGINAL_KEY, TARGET_KEY, SUFFIX_KEY = "diff_original_image", "diff_target_image", "diff_target_name"
MASK_THRESHOLD = 10  # in 8-bit steps summed over R, G and B (TrainTrain's value)


@dataclass
class PairDataset:
    """Originals as a LatentDataset (for bucketed batching); targets and masks by the same index."""

    origs: LatentDataset
    targs: list[Sample]
    masks: list[torch.Tensor]  # [1, h, w] change mask per pair

    def __len__(self) -> int:
        return len(self.targs)


@dataclass
class PairBatch:
    orig: Batch
    targ: Batch
    mask: torch.Tensor  # [B, 1, h, w]


class PairBatches(BucketBatches):
    """BucketBatches over the originals; each batch brings its targets and masks along."""

    def __init__(self, pairs: PairDataset, batch_size: int, seed: int, repeats: int = 1):
        super().__init__(pairs.origs, batch_size, seed, repeats)
        self.pairs = pairs

    def collate(self, indices: list[int]) -> PairBatch:  # type: ignore[override]
        orig = super().collate(indices)
        targ = collate_samples([self.pairs.targs[i] for i in indices], self.epoch)
        return PairBatch(orig, targ, torch.stack([self.pairs.masks[i] for i in indices]))


# ---- the files ---------------------------------------------------------------
def _stored_size(text: str, key: str) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; ConfigError naming `key`."""
    if not text:
        raise ConfigError(key, text, "no image given")
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(key, text, "file does not exist")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ConfigError(key, text, f"is too large to load safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ConfigError(key, text, f"is not a readable image ({exc})") from exc
    if width * height > MAX_PIXELS:  # also when a host lifted Pillow's own limit
        raise ConfigError(key, text, f"is {width}x{height} = {width * height:,} pixels, more than the "
                          f"{MAX_PIXELS:,} allowed (decompression-bomb guard)")
    return width, height


def _size_error(key: str, value: str, size: tuple[int, int], other: str, other_size: tuple[int, int]) -> ConfigError:
    return ConfigError(key, value, f"is {size[0]}x{size[1]} but {other} is {other_size[0]}x{other_size[1]}; "
                       "the two images of a pair must be the same size")


def check_pair_files(cfg: Any) -> tuple[Path, Path]:
    """The original and target image paths, after checking both exist and match in size.

    Cheap (headers only), so a job refuses a bad pair before loading any model.
    """
    orig_text, targ_text = cfg.diff_original_image.strip(), cfg.diff_target_image.strip()
    orig_size = _stored_size(orig_text, ORIGINAL_KEY)
    targ_size = _stored_size(targ_text, TARGET_KEY)
    if orig_size != targ_size:
        raise _size_error(TARGET_KEY, targ_text, targ_size, f"the original image {orig_text}", orig_size)
    return Path(orig_text).expanduser(), Path(targ_text).expanduser()


def find_pairs(folder: str, suffix: str, *, trigger: str = "", use_filename: bool = False) -> list[tuple[ImageItem, ImageItem]]:
    """(original, target) items: ``x.<ext>`` with ``x<suffix>.<ext>`` in the same folder."""
    if not suffix:
        raise ConfigError(SUFFIX_KEY, suffix, "is empty; give the suffix that marks target images, "
                          "e.g. _closed for img1.png / img1_closed.png")
    # keep_masks: "_mask" may be the target suffix here, not a loss mask
    items = scan_images(folder, trigger=trigger, use_filename=use_filename, keep_masks=True)
    by_stem = {(i.path.parent, i.path.stem): i for i in items}
    pairs = []
    for item in items:
        if item.path.stem.endswith(suffix):
            continue  # a target (or an original whose own name ends with the suffix)
        partner = by_stem.get((item.path.parent, item.path.stem + suffix))
        if partner is not None:
            pairs.append((item, partner))
    if not pairs:
        raise ConfigError(SUFFIX_KEY, suffix, f"no image under {folder} has a partner named <name>{suffix}.<ext>")
    log.info("found %d image pairs in %s", len(pairs), folder)
    return pairs


def native_bucket(width: int, height: int, multiple: int, key: str = ORIGINAL_KEY) -> Bucket:
    """The image's own size rounded down to the model's pixel multiple."""
    bucket = (width // multiple * multiple, height // multiple * multiple)
    if min(bucket) == 0:
        raise ConfigError(key, f"{width}x{height}", f"each side must be at least the model's multiple {multiple}")
    return bucket


# ---- encoding ------------------------------------------------------------------
def change_map(orig: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """[H, W] float: 1 where the two [3, H, W] images (in -1..1) differ by more than MASK_THRESHOLD."""
    diff = (orig - targ).abs().sum(0) * 127.5  # back to 8-bit steps
    return (diff > MASK_THRESHOLD).float()


def latent_mask(changed: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, h, w]: a latent cell counts as changed when any of its pixels did."""
    return F.adaptive_max_pool2d(changed[None, None], latent_hw)[0]


def _load(item: ImageItem, key: str):
    try:
        return load_image(item.path)
    except UnreadableImage as exc:
        raise ConfigError(key, str(item.path), f"is not a readable image ({exc.__cause__ or exc})") from exc


def _queue_pair(enc: LatentEncoder, orig: ImageItem, targ: ImageItem, plan: Callable[[int, int], list[Variant]],
                keys: tuple[str, str], changes: list[torch.Tensor]) -> None:
    """Load both images, check their sizes, and queue every variant of the pair for the VAE."""
    (o_rgb, o_alpha), (t_rgb, t_alpha) = _load(orig, keys[0]), _load(targ, keys[1])
    if o_rgb.size != t_rgb.size:
        raise _size_error(keys[1], str(targ.path), t_rgb.size, f"its original {orig.path}", o_rgb.size)
    size = (o_rgb.height, o_rgb.width)
    for v in plan(o_rgb.width, o_rgb.height):
        o_px, t_px = render_variant(o_rgb, o_alpha, v), render_variant(t_rgb, t_alpha, v)
        changes.append(change_map(o_px.tensor, t_px.tensor))
        # consecutive indices: sample 2k is pair k's original, 2k+1 its target
        enc.add(v.bucket, PendingImage(orig, size, v.sub_index, v.mirrored, o_px))
        enc.add(v.bucket, PendingImage(targ, size, v.sub_index, v.mirrored, t_px))


def encode_pairs(pairs: Sequence[tuple[ImageItem, ImageItem]], cfg: Any, bundle: Any, *, device: torch.device,
                 buckets: Buckets | None = None, progress: Callable[[int, int], Any] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 keys: tuple[str, str] = (ORIGINAL_KEY, TARGET_KEY)) -> PairDataset:
    """Latents of every pair (and of its sub/mirrored copies when `buckets` is given).

    Without `buckets` each pair trains at its own size (Difference, ADDifT).
    """
    dtype = compute_dtype(cfg.train_VAE_precision, device)
    changes: list[torch.Tensor] = []
    mult = bundle.latent_multiple

    def plan(width: int, height: int) -> list[Variant]:
        if buckets is None:
            return [Variant(native_bucket(width, height, mult, keys[0]))]
        return plan_variants(width, height, buckets, cfg.sub_image_num, cfg.image_mirroring)

    with vae_for_encoding(bundle.vae, device, dtype) as vae:
        enc = LatentEncoder(vae, device, dtype, bundle.vae_scale, bundle.vae_shift, 4, torch.device("cpu"),
                            cfg.train_VAE_precision)
        for n, (orig, targ) in enumerate(pairs):
            check_stop(should_stop)
            _queue_pair(enc, orig, targ, plan, keys, changes)
            if progress is not None:
                progress(n + 1, len(pairs))
        check_stop(should_stop)
        enc.flush_all()
    samples = [enc.done[i] for i in sorted(enc.done)]
    origs, targs = samples[0::2], samples[1::2]
    masks = [latent_mask(c, tuple(s.latent.shape[-2:])) for c, s in zip(changes, origs, strict=True)]
    return PairDataset(LatentDataset(origs, buckets or Buckets([], [], 0, 1.0), images=len(pairs)), targs, masks)


def folder_pairs(cfg: Any, bundle: Any, *, device: torch.device, progress=None, should_stop=None) -> PairDataset:
    """Multi-ADDifT's pairs from ``lora_data_directory``, bucketed like LoRA mode."""
    pairs = find_pairs(cfg.lora_data_directory, cfg.diff_target_name, trigger=cfg.lora_trigger_word,
                       use_filename=cfg.image_use_filename_as_tag)
    buckets = make_buckets(cfg.image_size, cfg.image_buckets_step, cfg.image_min_length, cfg.image_max_ratio,
                           bundle.latent_multiple)
    return encode_pairs(pairs, cfg, bundle, device=device, buckets=buckets, progress=progress,
                        should_stop=should_stop, keys=(DATA_KEY, DATA_KEY))


def single_pair(cfg: Any, bundle: Any, *, device: torch.device, orig_caption: str, targ_caption: str,
                should_stop=None) -> PairDataset:
    """The one pair of Difference / ADDifT, at its own size."""
    orig, targ = check_pair_files(cfg)
    items = (ImageItem(orig, orig_caption), ImageItem(targ, targ_caption))
    return encode_pairs([items], cfg, bundle, device=device, should_stop=should_stop)
