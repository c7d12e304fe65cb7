"""LoRA-mode data: scan a folder, caption, bucket, cache latents and text, batch.

Typical use::

    items = scan_images(cfg.lora_data_directory, trigger=cfg.lora_trigger_word,
                        use_filename=cfg.image_use_filename_as_tag)
    data = build_latent_dataset(items, cfg, bundle, device=device,
                                progress=report, should_stop=stop.is_set)
    batches = iter(BucketBatches(data, cfg.train_batch_size, seed, repeats=cfg.image_num_multiply))
    tricks = CaptionTricks.from_config(cfg, seed)   # shuffle / dropout, seeded
    text = TextCache(encode_fn)            # unless the text encoder trains or captions change per step
    batch = next(batches); cond = text.get(tricks.batch(batch.captions))

Public API:

* ``IMAGE_EXTENSIONS``; ``scan_images(folder, trigger=, use_filename=) -> list[ImageItem]``
  (ImageItem(path, caption)); ``read_caption(path, trigger=, use_filename=)``; loss masks
  (``*_mask.png``) are never listed as images; ``mask_file(image) -> Path | None``.
* ``make_buckets(size_hw, step, min_length, max_ratio, multiple) -> Buckets`` (.main, .sub
  lists of (width, height)); ``nearest_bucket(width, height, buckets)``.
* ``load_image(path) -> (RGB image, alpha mask [1, H, W] or None)``;
  ``resize_cover_crop(img, width, height) -> (image, (crop_top, crop_left))``;
  ``load_mask(path, (width, height)) -> [1, H, W]`` (a grayscale mask file, resized to its image).
* ``build_latent_dataset(items, cfg, bundle, device=, multiple=, progress=, should_stop=,
  store_device=) -> LatentDataset`` (a list of Sample, one per variant; ``len()`` is the
  number of variants; ``.skipped`` / ``.not_upscaled`` list the files left out). Each
  Sample's ``mask`` is the alpha, or with ``cfg.masked_loss`` the image's ``_mask.png``.
* ``BucketBatches(dataset, batch_size, seed, repeats=1)``: iterating yields Batch forever.
* ``TextCache(encode_fn)``: ``get(captions)`` -> cond-like (``.hidden``, ``.pooled``).
* ``CaptionTricks(shuffle, keep_tokens, dropout_rate, tag_dropout_rate, seed)``:
  ``apply(caption)`` / ``batch(captions)``; ``.changes_per_step`` says a text cache is useless.
* ``Stopped``: raised when ``should_stop()`` returns True while preparing.

All setting errors are ``ConfigError`` naming the preset key (``lora_data_directory``,
``image_size(height, width)``, ``train_VAE_precision``...) and the value or file.
"""
from __future__ import annotations

from .batches import Batch, BucketBatches
from .buckets import Bucket, Buckets, make_buckets, nearest_bucket, sub_buckets_for
from .cache import LatentDataset, build_latent_dataset, vae_for_encoding
from .captions import CaptionTricks, split_tags
from .images import MAX_PIXELS, UnreadableImage, load_image, load_mask, resize_cover_crop
from .scan import IMAGE_EXTENSIONS, ImageItem, find_images, mask_file, read_caption, scan_images
from .stop import Stopped
from .text import CondBatch, TextCache
from .variants import Sample, Variant, plan_variants

__all__ = [
    "IMAGE_EXTENSIONS", "MAX_PIXELS", "Batch", "Bucket", "BucketBatches", "Buckets", "CaptionTricks",
    "CondBatch", "ImageItem", "LatentDataset", "Sample", "Stopped", "TextCache", "UnreadableImage",
    "Variant", "build_latent_dataset", "find_images", "load_image", "load_mask", "make_buckets",
    "mask_file", "nearest_bucket", "plan_variants", "read_caption", "resize_cover_crop", "scan_images",
    "split_tags", "sub_buckets_for", "vae_for_encoding",
]
