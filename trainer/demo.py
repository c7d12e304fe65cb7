"""A built-in demo: a tiny SD1-layout model and a dozen generated images with captions.

It lets a newcomer press Start and get a LoRA and a loss plot in seconds on a CPU (about
15 s on a loaded 2-core machine), without any download. The model is random (it draws
noise, not pictures): it is there to show the workflow, not to make art. Everything is
generated from fixed seeds into the cache folder, once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .paths import cache_dir

log = logging.getLogger(__name__)

DEMO_MODEL = "traindeck-demo-sd1"
COLORS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
_SEED = 1234


def demo_root() -> Path:
    return cache_dir() / "demo"


def _save_model(folder: Path) -> None:
    """Random tiny UNet/VAE/CLIP in the diffusers layout (SD1 block structure, 32-64 channels)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        # No attention at the full latent size: at 512 px that alone would cost seconds per step.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=1,
                                      num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        part.save_pretrained(str(folder / name), safe_serialization=True)
    sched.save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": ["diffusers", "DDPMScheduler"], "tokenizer": [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _draw(shape: str, color: tuple[int, int, int], index: int, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(_SEED + index)
    bg = tuple(int(c) for c in rng.integers(150, 250, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = (int(v) for v in (rng.integers(40, 88), rng.integers(40, 88), rng.integers(22, 36)))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def _save_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (shape, color) in enumerate((s, c) for s in SHAPES for c in COLORS):
        stem = f"{i:02d}_{color}_{shape}"
        _draw(shape, COLORS[color], i).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {color} {shape}, flat shape", encoding="utf-8")


def ensure_demo(root: Path | None = None) -> tuple[Path, Path]:
    """(models folder holding the demo model, images folder), created on first use."""
    root = Path(root or demo_root())
    models, images = root / "models", root / "images"
    model = models / DEMO_MODEL
    if not (model / "model_index.json").is_file():
        log.info("creating the demo model in %s", model)
        tmp = models / f".{DEMO_MODEL}.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        _save_model(tmp)
        tmp.rename(model)  # complete or absent, never half-written
    if not any(images.glob("*.png")):
        _save_images(images)
    return models, images
