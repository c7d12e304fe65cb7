"""Shared pieces of the benchmarks: a CPU-sized SD1-like model, an in-memory host,
generated images, the benchmark's training config, and small statistics helpers.

Everything is built in memory from seeds; nothing is downloaded or written to the
repository (logs and outputs go to a temporary folder).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/step.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.config.schema import BLOCK_IDS, TrainConfig  # noqa: E402
from trainer.training.events import Progress  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

ALGOS = ("lierla", "c3lier", "loha", "lokr")
PIXELS = 256            # 32x32 latents
TEXT_DIM = 256          # CLIP hidden size = the U-Net's cross-attention width
RANK, ALPHA = 16, 8.0
LEARNING_RATE = 1e-4
SEED = 1234
# VAE (block channels, layers per block, norm groups). "scaled" is SD1's VAE layout at the
# U-Net's ~1/5 width: one encode costs 0.63 of a frozen U-Net step here and 0.65 on SD1.5 at
# 512 px (bench/flops.py), so its P2 is the one to read; it is the default. "small" makes
# caching nearly free (0.21); "sd" is SD1's VAE at its real size on the small U-Net (14.6).
VAES = {"scaled": ((26, 52, 104, 104), 2, 13), "small": ((32, 32, 32, 32), 1, 32), "sd": ((128, 256, 512, 512), 2, 32)}


# Heads per level. SD1.5 has 8 heads of 40, 80 and 160 channels; 8 heads at 1/5 width would be
# 8, 16 and 32 channels wide, and on a CPU such thin heads ran attention at a fraction of its
# speed (43% of a step's time in the profiler), making the U-Net's cost unlike SD1.5's: an
# encode took 0.24-0.35 of a step here against 0.45-0.53 for SD1.5 itself at 256 px
# (`bench/step.py --model sd15`). Heads of 32, 64 and 64 channels keep the parameters and FLOPs.
HEADS = (2, 2, 4, 4)


def sd1_unet(seed: int = SEED, cross_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """SD1's block layout (4 levels, 2 layers each) at 1/5 of its channels, heads of 32-64 channels: ~35M params
    (37.5M with SD1's 768-wide cross-attention)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=PIXELS // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=HEADS, cross_attention_dim=cross_dim, norm_num_groups=32,
    )


def bench_bundle(seed: int = SEED, vae: str = "scaled", text_dim: int = TEXT_DIM,
                 text_layers: int = 2) -> ModelBundle:
    """The benchmark's model: the U-Net above, a CLIP of `text_layers` layers `text_dim` wide (2 x 256 unless
    told), a 4-level VAE (see VAES); frozen, fp32."""
    unet = sd1_unet(seed, cross_dim=text_dim)
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=text_dim * 4, num_attention_heads=max(4, text_dim // 64),
        num_hidden_layers=text_layers, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    channels, layers, groups = VAES[vae]
    vae_model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups, sample_size=PIXELS)
    return frozen_sd1_bundle(unet, vae_model, te, "bench-sd1")


def frozen_sd1_bundle(unet, vae, te, name: str) -> ModelBundle:
    """An SD1 bundle of these models with SD1's noise schedule, every module in eval mode and frozen."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    bundle = ModelBundle(family="sd1", unet=unet, vae=vae, text_encoders=[te], tokenizers=[clip_tokenizer()],
                         noise_scheduler=sched, name=name, source="memory")
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class BenchHost:
    """A host whose model is already in memory (as in a WebUI); it only hands it over."""

    name = "bench"

    def __init__(self, bundle: ModelBundle, lora_dir: Path):
        self.bundle = bundle
        self._lora_dir = Path(lora_dir)

    def lora_dir(self) -> Path:
        return self._lora_dir

    def load_bundle(self, cfg: TrainConfig, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
        for module in self.bundle.modules():
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(dtype=dtype)
        return self.bundle

    def encode_fn(self, bundle: ModelBundle) -> None:
        return None

    @contextmanager
    def session(self) -> Iterator[None]:
        yield

    def progress(self, p: Progress) -> None:
        pass

    def saved(self, path: Path) -> None:
        pass


def make_images(folder: Path, n: int = 4, size: int = PIXELS) -> Path:
    """n distinct patterned RGB images with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[..., 0] = (xx + 40 * i) % 256
        img[..., 1] = yy % 256
        img[..., 2] = np.where(((xx // 16 + yy // 16 + i) % 2) == 0, 230, 20)
        Image.fromarray(img).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"pattern {i}, checkers", encoding="utf-8")
    return folder


def bench_config(algo: str, data: Path, steps: int, name: str) -> TrainConfig:
    """LoRA mode, BASE off (frozen text encoder, cached captions), fp32, AdamW, rank 16 / alpha 8, batch 1."""
    return TrainConfig(
        mode="LoRA", network_type=algo, save_lora_name=name, lora_data_directory=str(data),
        image_size=[PIXELS, PIXELS], image_buckets_step=64, image_min_length=PIXELS, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"],
    )


class StepClock:
    """A Progress listener: wall and process-CPU time at each training-step event."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float, float]] = []

    def __call__(self, p: Progress) -> None:
        # The first event of each step is its end; a later one (e.g. "saved ...") is not.
        if p.phase == "training" and (not self.marks or p.step != self.marks[-1][0]):
            self.marks.append((p.step, time.perf_counter(), time.process_time()))

    def durations(self) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of step k = mark(k) - mark(k-1), for consecutive steps only."""
        wall, cpu = [], []
        for (s0, w0, c0), (s1, w1, c1) in zip(self.marks, self.marks[1:]):
            if s1 == s0 + 1:
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
        return wall, cpu


def steady(seconds: list[float], warmup: int) -> list[float]:
    """Drop the warm-up steps (allocator, first-touch, lazy inits)."""
    return seconds[warmup:] if len(seconds) > warmup else seconds[-1:]


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other work right now (from /proc/stat over `seconds`; we sleep meanwhile).

    Unlike the load average, this does not lag behind, nor count our own earlier runs.
    """
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[0] == first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return round((os.cpu_count() or 1) * (1.0 - idle / total), 2)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What the numbers were measured on."""
    import diffusers
    from importlib.metadata import version

    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "device": "cpu",
        "cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "diffusers": diffusers.__version__,
        "lycoris": version("lycoris-lora"), "transformers": version("transformers"),
        "peft": _version_or_none("peft"),
    }


def _version_or_none(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
