"""LoRA-mode data: scan a folder, caption, bucket, cache latents and text, batch.

Typical use::

    items = scan_images(cfg.lora_data_directory, trigger=cfg.lora_trigger_word,
                        use_filename=cfg.image_use_filename_as_tag)
    data = build_latent_dataset(items, cfg, bundle, device=device,
                                progress=report, should_stop=stop.is_set)
    batches = iter(BucketBatches(data, cfg.train_batch_size, seed, repeats=cfg.image_num_multiply))
    text = TextCache(encode_fn)            # unless the text encoder trains
    batch = next(batches); cond = text.get(batch.captions)

Public API:

* ``IMAGE_EXTENSIONS``; ``scan_images(folder, trigger=, use_filename=) -> list[ImageItem]``
  (ImageItem(path, caption)); ``read_caption(path, trigger=, use_filename=)``.
* ``make_buckets(size_hw, step, min_length, max_ratio, multiple) -> Buckets`` (.main, .sub
  lists of (width, height)); ``nearest_bucket(width, height, buckets)``.
* ``load_image(path) -> (RGB image, alpha mask [1, H, W] or None)``;
  ``resize_cover_crop(img, width, height) -> (image, (crop_top, crop_left))``.
* ``build_latent_dataset(items, cfg, bundle, device=, multiple=, progress=, should_stop=,
  store_device=) -> LatentDataset`` (a list of Sample, one per variant; ``len()`` is the
  number of variants; ``.skipped`` / ``.not_upscaled`` list the files left out).
* ``BucketBatches(dataset, batch_size, seed, repeats=1)``: iterating yields Batch forever.
* ``TextCache(encode_fn)``: ``get(captions)`` -> cond-like (``.hidden``, ``.pooled``).
* ``Stopped``: raised when ``should_stop()`` returns True while preparing.

All setting errors are ``ConfigError`` naming the preset key (``lora_data_directory``,
``image_size(height, width)``, ``train_VAE_precision``...) and the value or file.
"""
from __future__ import annotations

from .batches import Batch, BucketBatches
from .buckets import Bucket, Buckets, make_buckets, nearest_bucket, sub_buckets_for
from .cache import LatentDataset, build_latent_dataset, vae_for_encoding
from .images import MAX_PIXELS, UnreadableImage, load_image, resize_cover_crop
from .scan import IMAGE_EXTENSIONS, ImageItem, find_images, read_caption, scan_images
from .stop import Stopped
from .text import CondBatch, TextCache
from .variants import Sample, Variant, plan_variants

__all__ = [
    "IMAGE_EXTENSIONS", "MAX_PIXELS", "Batch", "Bucket", "BucketBatches", "Buckets", "CondBatch",
    "ImageItem", "LatentDataset", "Sample", "Stopped", "TextCache", "UnreadableImage", "Variant",
    "build_latent_dataset", "find_images", "load_image", "make_buckets", "nearest_bucket",
    "plan_variants", "read_caption", "resize_cover_crop", "scan_images", "sub_buckets_for",
    "vae_for_encoding",
]
