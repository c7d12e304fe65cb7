"""The model, data set and import shim that bench/peers.py hands every program.

One random-weight SD1-layout model (the bench U-Net with SD1's 768-wide cross-attention,
a 4-layer CLIP 768 wide, the small bench VAE) saved once as a diffusers folder, which all
three programs load (kohya's train_network.py turns a diffusers U-Net into its own class;
the example and the project read the folder as it is); one data set of patterned images
with captions laid out as each program reads it; and a minimal stand-in for the part of
torchvision's transforms that the peers import (torchvision is not installed here).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.common import PIXELS, SEED, bench_bundle, make_images

TEXT_DIM, TEXT_LAYERS = 768, 4
UNET_CHANNELS = (64, 128, 256, 256)
KOHYA_TOKENIZER = "openai_clip-vit-large-patch14"  # the folder name kohya's --tokenizer_cache_dir looks for


def write_model(folder: Path) -> dict:
    """The benchmark model as a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler); its sizes."""
    from diffusers import StableDiffusionPipeline

    bundle = bench_bundle(SEED, vae="small", text_dim=TEXT_DIM, text_layers=TEXT_LAYERS)
    unet, vae, te = bundle.unet, bundle.vae, bundle.text_encoders[0]
    if tuple(unet.config.block_out_channels) != UNET_CHANNELS:
        raise RuntimeError(f"bench U-Net widths {unet.config.block_out_channels} differ from {UNET_CHANNELS}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=bundle.tokenizers[0], unet=unet,
                                   scheduler=bundle.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": count(unet), "text_encoder_params": count(te), "vae_params": count(vae),
            "unet_channels": list(UNET_CHANNELS), "text_dim": TEXT_DIM, "text_layers": TEXT_LAYERS}


def write_tokenizer_cache(model: Path, cache: Path) -> Path:
    """kohya loads its CLIP tokenizer by hub name unless a cache folder holds it: put the model's there."""
    target = cache / KOHYA_TOKENIZER
    shutil.copytree(model / "tokenizer", target, dirs_exist_ok=True)
    return cache


def write_data(root: Path, n: int, size: int = PIXELS) -> dict[str, Path]:
    """n images of `size` px with captions, as each program reads them: {program: folder}."""
    plain = make_images(root / "1_bench", n=n, size=size)  # kohya: <repeats>_<name>/ under the data dir
    example = root.parent / "imagefolder"  # the example: an image folder with metadata.jsonl
    example.mkdir(parents=True, exist_ok=True)
    lines = []
    for png in sorted(plain.glob("*.png")):
        shutil.copy2(png, example / png.name)
        lines.append(json.dumps({"file_name": png.name, "text": png.with_suffix(".txt").read_text(encoding="utf-8")}))
    (example / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"project": plain, "kohya": root, "diffusers": example}


# The transforms the peers use at import and for 256 px square images; anything else fails loudly.
_TRANSFORMS = '''"""Stand-in for the few torchvision transforms two training scripts use (bench only)."""
import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    NEAREST_EXACT = "nearest-exact"
    BOX = "box"
    HAMMING = "hamming"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
        "nearest-exact": Image.NEAREST, "box": Image.BOX, "hamming": Image.HAMMING}


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = float(mean[0]), float(std[0])

    def __call__(self, t):
        return (t - self.mean) / self.std


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = int(size), _PIL[interpolation.value]

    def __call__(self, img):
        w, h = img.size
        s = self.size / min(w, h)
        return img.resize((round(w * s), round(h * s)), self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = int(size)

    def __call__(self, img):
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


RandomCrop = CenterCrop  # the bench images are already square at the training size


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        raise NotImplementedError("bench stand-in: random flips are not part of the benchmark")


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)
'''
_FUNCTIONAL = '''"""Stand-in: only what a bench run reaches."""
import numpy as np
import torch


def pil_to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def gaussian_blur(*args, **kwargs):
    raise NotImplementedError("bench stand-in: gaussian_blur is not part of the benchmark")
'''


def write_torchvision_stub(folder: Path) -> Path:
    """A folder to put on PYTHONPATH for the peers only: torchvision.transforms as used above."""
    pkg = folder / "torchvision"
    (pkg / "transforms").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Bench stand-in for torchvision (transforms only)."""\n'
                                     '__version__ = "0.0+bench"\nfrom . import transforms\n', encoding="utf-8")
    (pkg / "transforms" / "__init__.py").write_text(
        _TRANSFORMS + "\n\nfrom . import functional  # noqa: E402\n", encoding="utf-8")
    (pkg / "transforms" / "functional.py").write_text(_FUNCTIONAL, encoding="utf-8")
    return folder
