"""What copies of one image are trained (main, sub, mirrored) and their pixels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import Bucket, Buckets, nearest_bucket, sub_buckets_for
from .images import cover_geometry, image_to_tensor, mask_to_image, resize_cover_crop

_FLIP = Image.Transpose.FLIP_LEFT_RIGHT


@dataclass(frozen=True)
class Variant:
    """One trained copy of an image: its bucket, which sub copy (0 = main) and mirroring."""

    bucket: Bucket
    sub_index: int = 0
    mirrored: bool = False


@dataclass
class Sample:
    """A cached training item: one variant of one image, already VAE-encoded."""

    latent: torch.Tensor  # [4, h/8, w/8], float32, on the store device
    caption: str
    bucket: Bucket  # (width, height) in pixels
    original_size: tuple[int, int]  # (height, width) of the source image, upright
    crop_top_left: tuple[int, int]  # in the resized image, as SDXL conditions on it
    mask: torch.Tensor | None  # [1, h/8, w/8] in 0..1: alpha, or <stem>_mask.png with masked_loss; None when neither
    source: Path
    sub_index: int = 0
    mirrored: bool = False

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) the image is trained at."""
        return (self.bucket[1], self.bucket[0])


def plan_variants(width: int, height: int, buckets: Buckets, sub_image_num: int,
                  mirroring: bool) -> list[Variant]:
    """Main copy in the nearest-ratio main bucket, then sub copies, each also mirrored if asked."""
    main = nearest_bucket(width, height, buckets.main)
    plain = [Variant(main, 0)]
    plain += [Variant(b, i + 1) for i, b in enumerate(sub_buckets_for(width, height, main, buckets, sub_image_num))]
    if not mirroring:
        return plain
    return [v2 for v in plain for v2 in (v, Variant(v.bucket, v.sub_index, True))]


@dataclass
class Pixels:
    """A variant ready for the VAE: [3, H, W] in -1..1 and the SDXL geometry."""

    tensor: torch.Tensor
    crop_top_left: tuple[int, int]
    mask: Image.Image | None  # "F" image at bucket size, resized to latent size later


def render_variant(rgb: Image.Image, mask: torch.Tensor | None, variant: Variant) -> Pixels:
    """Resize to cover the bucket, centre-crop, and mirror when the variant says so.

    For a mirrored copy the crop's left offset is measured from the flipped image's left
    edge (``resized_w - width - left``), which is what the model sees.
    """
    bw, bh = variant.bucket
    img, (top, left) = resize_cover_crop(rgb, bw, bh)
    mask_img = resize_cover_crop(mask_to_image(mask), bw, bh)[0] if mask is not None else None
    if variant.mirrored:
        rw = cover_geometry(rgb.width, rgb.height, bw, bh)[0]
        left = rw - bw - left
        img = img.transpose(_FLIP)
        mask_img = mask_img.transpose(_FLIP) if mask_img is not None else None
    return Pixels(image_to_tensor(img), (top, left), mask_img)


def mask_at(mask_img: Image.Image | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """Alpha mask averaged down to latent resolution, [1, h, w] in 0..1."""
    if mask_img is None:
        return None
    h, w = latent_hw
    small = mask_img.resize((w, h), Image.Resampling.BOX)
    return torch.from_numpy(np.array(small, dtype=np.float32)).clamp_(0.0, 1.0).unsqueeze(0)
