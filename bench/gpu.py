"""Accelerator figures: it/s and peak memory of an SD1.5-size LoRA job, and P1 on the device.

    python bench/gpu.py [--device cuda] [--dtype fp16|bf16] [--steps N] [--rounds R] [--no-p2] [--tiny]

A random-weight model with SD1.5's architecture (U-Net 320-640-1280-1280 with
768-wide cross-attention, CLIP ViT-L/14's text encoder, SD's VAE) trains LierLa
rank 16 at 512x512, batch 1, frozen weights in the chosen dtype, LoRA in fp32 under
autocast. For gradient checkpointing off and on it runs bare, trainer, bare, ...
(bench/bare.py's loop on its own copy of the U-Net, same deltas, same dtypes) and
reports the trainer's it/s, P1 (trainer ms/step over the neighbouring bare ones) and
the peak memory allocated while each side's steps ran, from torch's allocator
statistics (None on a CPU). Only one side's U-Net is on the device at a time.
P2 (needs peft) sets the trainer's steps/s against bench/reference.py's peft loop that
VAE-encodes each step, in the same dtype under autocast, checkpointing off.
`--tiny` swaps in the CPU benchmark's model at 256 px, so the script itself can be
checked without an accelerator. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import (LEARNING_RATE, SEED, BenchHost, StepClock, bench_bundle, bench_config,  # noqa: E402
                          frozen_sd1_bundle, make_images, median_ms, n_params, steady)
from trainer.training import devices  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.training.engine import Trainer  # noqa: E402
from trainer.networks.network import Network  # noqa: E402
from trainer.families.textenc import encode_prompts  # noqa: E402


def sd15_bundle(seed: int = SEED) -> ModelBundle:
    """SD1.5's three models at their real sizes, random weights, fp32 on the CPU, frozen."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5's layout
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512)
    return frozen_sd1_bundle(unet, vae, te, "bench-sd15")


class DeviceHost(BenchHost):
    """The in-memory model, handed over on the training device in the training dtype."""

    def load_bundle(self, cfg, *, dtype: torch.dtype, device: torch.device) -> ModelBundle:
        for module in self.bundle.modules():
            module.to(device=device, dtype=dtype)
        return self.bundle


class Memory:
    """Peak allocator memory from the first training step on (training steps only, not caching)."""

    def __init__(self, device: torch.device):
        self.mod = getattr(torch, device.type, None) if device.type != "cpu" else None
        self.device = device

    def reset(self) -> None:
        if self.mod is not None:
            self.mod.synchronize(self.device)
            self.mod.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return int(self.mod.max_memory_allocated(self.device)) if self.mod is not None else None

    def listener(self, p) -> None:
        if p.phase == "training" and p.step == 0:
            self.reset()


class GpuBench:
    """Model, data, bare copy and configs of one run."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.device = args, torch.device(args.device)
        self.pixels = 256 if args.tiny else 512
        self.bundle = bench_bundle(vae="small") if args.tiny else sd15_bundle()
        self.dtype = devices.compute_dtype(args.dtype, self.device)
        self.data = make_images(work / "data", size=self.pixels)
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        self.memory = Memory(self.device)
        self.runs = 0
        with torch.no_grad():
            self.cond = encode_prompts(self.bundle, ["pattern 0, checkers"]).hidden.detach()
        self.bare_unet, self.deltas = self._bare_copy()

    def cfg(self, steps: int, checkpointing: bool):
        self.runs += 1
        px = self.pixels
        cfg = bench_config("lierla", self.data, steps, f"gpu-{self.runs}")
        return cfg.with_overrides({
            "image_size": [px, px], "image_min_length": px, "train_model_precision": self.args.dtype,
            "use_gradient_checkpointing": checkpointing})

    def _bare_copy(self) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
        """A U-Net copy with bare LoRA deltas on the trainer's layers, built on the CPU in fp32."""
        # copies made before any network hooks the bundle's layers
        self.pristine = copy.deepcopy(self.bundle.unet) if self.args.p2 else None  # P2's peft copy starts here
        unet = copy.deepcopy(self.bundle.unet)
        network = Network.build(self.bundle, self.cfg(1, False))
        try:
            names = {id(m): name for name, m in self.bundle.unet.named_modules()}
            targets = [(names[id(m.org_module[0])], m) for m in network.unet_modules]
            deltas = bare.attach(unet, "lierla", targets)
            worst = bare.check_same_math(deltas, targets)
        finally:
            network.remove()
        if worst > 1e-4:
            raise RuntimeError(f"bare delta differs from LyCORIS's by {worst:.2e}")
        return unet, deltas

    def park(self, module: torch.nn.Module) -> None:
        """Off the device, so the other side's peak is its own."""
        module.to("cpu")
        devices.empty_cache(self.device)

    def trainer_segment(self, steps: int, checkpointing: bool) -> tuple[list[float], int | None]:
        clock = StepClock()
        host = DeviceHost(self.bundle, self.lora_dir)
        result = Trainer(self.cfg(steps, checkpointing), host, device=self.device,
                         listeners=[clock, self.memory.listener]).run()
        peak = self.memory.peak()
        for module in self.bundle.modules():
            self.park(module)
        if result.status != "done" or result.steps != steps:
            raise RuntimeError(f"trainer run ended {result.status} after {result.steps} steps: {result.message}")
        return clock.durations()[0], peak

    def bare_segment(self, steps: int, checkpointing: bool, seed: int) -> tuple[list[float], int | None]:
        dev, dtype = self.device, self.dtype
        unet = self.bare_unet.to(device=dev, dtype=dtype)
        self.deltas.to(device=dev, dtype=torch.float32)  # trained in fp32, as the trainer's network is
        (unet.enable_gradient_checkpointing if checkpointing else unet.disable_gradient_checkpointing)()
        gen = torch.Generator().manual_seed(SEED)
        latents = torch.randn((1, 4, self.pixels // 8, self.pixels // 8), generator=gen).to(dev)
        scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
        self.memory.reset()
        wall, _ = bare.bare_loop(unet, self.deltas, steps=steps, latents=latents, cond=self.cond.to(dev),
                                 alphas_cumprod=self.bundle.noise_scheduler.alphas_cumprod, snr_gamma=5.0,
                                 lr=LEARNING_RATE, seed=seed, autocast=lambda: devices.autocast(dev, dtype),
                                 scaler=scaler)
        peak = self.memory.peak()
        self.park(unet)
        self.deltas.to("cpu")
        return wall, peak


def measure(b: GpuBench, checkpointing: bool) -> dict:
    """bare, trainer, bare, ... with checkpointing on or off; it/s, P1 by round, peaks."""
    a = b.args
    bare_ms, bare_peak = [], []
    trainer_ms, trainer_peak = [], []

    def run_bare(seed: int) -> None:
        wall, peak = b.bare_segment(a.steps, checkpointing, seed)
        bare_ms.append(median_ms(steady(wall, a.warmup)))
        bare_peak.append(peak)

    run_bare(SEED)
    for r in range(a.rounds):
        wall, peak = b.trainer_segment(a.steps, checkpointing)
        trainer_ms.append(median_ms(steady(wall, a.warmup)))
        trainer_peak.append(peak)
        run_bare(SEED + r + 1)
        print(f"  checkpointing {'on' if checkpointing else 'off'} round {r + 1}: bare {bare_ms[-2]:.1f} | "
              f"trainer {trainer_ms[-1]:.1f} | bare {bare_ms[-1]:.1f} ms/step", flush=True)
    ratios = [t / ((bare_ms[i] + bare_ms[i + 1]) / 2) for i, t in enumerate(trainer_ms)]
    peak = (lambda xs: None if None in xs else max(xs))
    return {"P1": round(statistics.median(ratios), 4), "P1_by_round": [round(x, 4) for x in ratios],
            "trainer_it_s": round(1000.0 / statistics.median(trainer_ms), 3),
            "bare_it_s": round(1000.0 / statistics.median(bare_ms), 3),
            "trainer_ms": round(statistics.median(trainer_ms), 2), "bare_ms": round(statistics.median(bare_ms), 2),
            "peak_bytes_trainer": peak(trainer_peak), "peak_bytes_bare": peak(bare_peak)}


class DeviceReference:
    """bench/reference.py's peft loop (attention targets, VAE each step) on the device, parked between segments."""

    def __init__(self, b: GpuBench):
        from bench import reference
        from bench.common import ALPHA, RANK

        self.b = b
        self.unet, params = reference.with_peft_lora(b.pristine, RANK, ALPHA, list(reference.ATTENTION_TARGETS))
        self.params = params
        self.make = lambda: reference.Reference(b.bundle, self.unet, params, b.data, LEARNING_RATE, device=b.device,
                                                autocast=lambda: devices.autocast(b.device, b.dtype))

    def segment(self, steps: int, seed: int) -> list[float]:
        b = self.b
        for module in (b.bundle.vae, b.bundle.text_encoders[0], self.unet):
            module.to(device=b.device, dtype=b.dtype)
        for p in self.params:  # the LoRA weights train in fp32, as the script casts them
            p.data = p.data.float()
        wall, _ = self.make().segment(steps, seed)
        for module in (b.bundle.vae, b.bundle.text_encoders[0], self.unet):
            b.park(module)
        return wall


def measure_p2(b: GpuBench) -> dict:
    """Trainer steps/s over the peft reference's, checkpointing off: ref, trainer, ref, ..."""
    from bench.reference import peft_missing

    why = peft_missing()
    if why is not None:
        return {"P2": None, "P2_reason": why}
    a, ref = b.args, DeviceReference(b)
    ref_ms = [median_ms(steady(ref.segment(a.steps, SEED), a.warmup))]
    trainer_ms = []
    for r in range(a.rounds):
        trainer_ms.append(median_ms(steady(b.trainer_segment(a.steps, False)[0], a.warmup)))
        ref_ms.append(median_ms(steady(ref.segment(a.steps, SEED + r + 1), a.warmup)))
        print(f"  P2 round {r + 1}: peft {ref_ms[-2]:.1f} | trainer {trainer_ms[-1]:.1f} | peft {ref_ms[-1]:.1f} ms/step",
              flush=True)
    ratios = [(ref_ms[i] + ref_ms[i + 1]) / 2 / t for i, t in enumerate(trainer_ms)]
    return {"P2": round(statistics.median(ratios), 4), "P2_by_round": [round(x, 4) for x in ratios],
            "P2_ms_per_step": {"trainer": round(statistics.median(trainer_ms), 2),
                               "peft_attention": round(statistics.median(ref_ms), 2)}}


def device_name(device: torch.device) -> str:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "get_device_name"):
        return str(mod.get_device_name(device))
    from bench.common import cpu_model

    return cpu_model()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=str(devices.pick_device()), help="torch device (default: the accelerator torch reports)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="bf16", help="frozen weights and autocast")
    p.add_argument("--steps", type=int, default=30, help="steps per segment")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped per segment")
    p.add_argument("--rounds", type=int, default=2, help="trainer segments per setting")
    p.add_argument("--no-p2", dest="p2", action="store_false", help="skip P2 (needs peft)")
    p.add_argument("--tiny", action="store_true", help="the CPU benchmark's model at 256 px (checks the script)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must be more than --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = GpuBench(args, Path(tmp))
        print(f"{device_name(b.device)}: U-Net {n_params(b.bundle.unet):,} params, {b.pixels} px, batch 1, "
              f"{args.dtype} weights, LierLa rank 16 in fp32; torch {torch.__version__}", flush=True)
        results = {f"checkpointing_{'on' if gc else 'off'}": measure(b, gc) for gc in (False, True)}
        p2 = measure_p2(b) if args.p2 else {}
    summary = {"P1": results["checkpointing_off"]["P1"], **results, **p2, "device": device_name(b.device),
               "device_type": b.device.type, "dtype": args.dtype, "model_dtype": str(b.dtype).replace("torch.", ""),
               "pixels": b.pixels, "unet_params": n_params(b.bundle.unet), "tiny": args.tiny,
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
               "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
