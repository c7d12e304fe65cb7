"""Test helpers for whole training jobs: an in-memory host, images, a quick config."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from trainer.families.bundle import ModelBundle
from trainer.config.schema import BLOCK_IDS, TrainConfig
from trainer.training.events import Progress

from tests.tiny import tiny_bundle


class MemoryHost:
    """A host whose model is already loaded (like a WebUI's); records what happens."""

    name = "memory"

    def __init__(self, lora_dir: Path, bundle: ModelBundle | None = None, family: str = "sd1"):
        self._lora_dir = Path(lora_dir)
        self.bundle = bundle or tiny_bundle(family)
        self.events: list[Progress] = []
        self.saved_paths: list[Path] = []
        self.sessions = 0
        self.in_session = False

    def lora_dir(self) -> Path:
        return self._lora_dir

    def load_bundle(self, cfg, *, dtype, device) -> ModelBundle:
        assert self.in_session, "the model is used outside the host session"
        for module in self.bundle.modules():
            module.to(dtype=dtype)
        return self.bundle

    def encode_fn(self, bundle):
        return None

    @contextmanager
    def session(self) -> Iterator[None]:
        self.sessions += 1
        self.in_session = True
        try:
            yield
        finally:
            self.in_session = False

    def progress(self, p: Progress) -> None:
        self.events.append(p)

    def saved(self, path: Path) -> None:
        self.saved_paths.append(path)


def make_images(folder: Path, n: int = 4, size: tuple[int, int] = (64, 64), captions: bool = True) -> Path:
    """n distinct, structured RGB images (gradients and blocks) with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[..., 0] = (xx * (255 // max(1, w - 1)) + 40 * i) % 256
        img[..., 1] = (yy * (255 // max(1, h - 1))) % 256
        img[..., 2] = np.where(((xx // 16 + yy // 16 + i) % 2) == 0, 230, 20)
        Image.fromarray(img).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"pattern {i}, stripes", encoding="utf-8")
    return folder


def quick_config(data: Path, **over) -> TrainConfig:
    """A LoRA job sized for tiny models: 64 px, a few steps, fp32."""
    base = dict(
        mode="LoRA", save_lora_name="tiny", lora_data_directory=str(data), image_size=[64, 64],
        image_buckets_step=64, image_min_length=64, image_max_ratio=2.0, train_iterations=4,
        train_batch_size=2, train_learning_rate=1e-3, network_rank=4, network_alpha=4.0,
        train_model_precision="fp32", save_precision="fp32", train_seed=7,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"],
    )
    base.update(over)
    return TrainConfig(**base)


def fixed_eval_loss(bundle: ModelBundle, latents: torch.Tensor, cond_hidden: torch.Tensor, seed: int = 0) -> float:
    """Denoising MSE on fixed noise and timesteps: comparable before/after training."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.linspace(50, 950, latents.shape[0]).long()
    noisy = bundle.noise_scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        pred = bundle.unet(noisy, t, cond_hidden, return_dict=False)[0]
    return float(torch.nn.functional.mse_loss(pred, noise))
