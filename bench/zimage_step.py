"""Z-Image trainer step time versus a bare PyTorch loop doing the same math (P1's Z-Image row).

    python bench/zimage_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random Z-Image-architecture transformer built in code (diffusers'
ZImageTransformer2DModel): 4 layers, 1 noise and 1 context refiner, 3 heads of 128 (384 wide),
Z-Image's rotary split of its 128-wide heads; 256 px images give 32x32 latents, patched 2x2 by the
transformer into 256 image tokens, next to the prompt's Qwen3 tokens. The Qwen3 text encoder and
the autoencoder are the tests' tiny ones: with cached latents and captions they run before
training only. Needs diffusers >= 0.36.

As bench/flux_step.py, in one process and interleaved to cancel drift: bare, trainer, bare, ...,
bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA mode, lierla,
BASE off, cached latents and captions, timestep_sampling shift 3.0, model_prediction_type raw,
constant LR, AdamW, fp32, batch 1). The bare side (`zimage_bare_loop`) draws
σ = shift(sigmoid(N(0,1))), noises the latents, runs the transformer on [C, 1, H, W] frames at
t = 1 − σ with the cached caption embeddings, negates its output, takes the MSE against
noise − x0, and steps AdamW on plain LoRA deltas (bench/bare.py) hooked into the same Linear
modules; `check_same_math` verifies that those deltas compute LyCORIS's output. A round's ratio
is the trainer's median ms/step over the mean of the bare medians just before and after it; P1
is the median over the rounds. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import ZImageTransformer2DModel  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import (LEARNING_RATE, SEED, environment, load_average, make_images,  # noqa: E402
                          n_params)
from bench.step import Bench, bench_algo, pick_threads  # noqa: E402
from tests.flux_tiny import tiny_flux_ae  # noqa: E402
from tests.zimage_tiny import tiny_qwen3, tiny_qwen_tokenizer  # noqa: E402
from trainer.config.schema import BLOCK_IDS, TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.textenc import encode_prompts  # noqa: E402
from trainer.families.zimage import ZImage, caption_list  # noqa: E402
from trainer.families.zimage_load import SCHEDULER, scheduler  # noqa: E402

RANK, ALPHA = 16, 8.0
SHIFT = SCHEDULER["shift"]  # Z-Image's scheduler shift (3.0), as the preset trains with
QWEN3_TOKENS = 32           # qwen3_max_token_length: the padding is cut, the prompt's tokens stay
PROMPT = "pattern 0, checkers"
# Transformer sizes. Z-Image has 30 layers, 2 noise and 2 context refiners, 30 heads of 128 (3840
# wide), rotary axes 32/48/48; "bench" keeps the head shape at about 1/8 of the depth and 1/10 of
# the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"layers": 4, "refiners": 1, "heads": 3, "head_dim": 128, "axes": [32, 48, 48], "pixels": 256},
    "tiny": {"layers": 1, "refiners": 1, "heads": 2, "head_dim": 32, "axes": [8, 12, 12], "pixels": 64},
}


def zimage_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """A Z-Image bundle: the transformer of `size`, tiny Qwen3/autoencoder; frozen, fp32, eval mode."""
    torch.manual_seed(seed)
    qwen3 = tiny_qwen3()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=size["heads"] * size["head_dim"],
        n_layers=size["layers"], n_refiner_layers=size["refiners"], n_heads=size["heads"], n_kv_heads=size["heads"],
        cap_feat_dim=qwen3.config.hidden_size, axes_dims=size["axes"], axes_lens=[256, 128, 128])
    bundle = ModelBundle(family="zimage", unet=transformer, vae=tiny_flux_ae(), text_encoders=[qwen3],
                         tokenizers=[tiny_qwen_tokenizer()], noise_scheduler=scheduler(), name="bench-zimage",
                         source="memory")
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def zimage_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """LoRA mode, lierla rank 16 / alpha 8, BASE off (cached captions), fp32, AdamW at a constant LR, batch 1;
    σ by shift 3.0, raw prediction, no min-SNR (a DDPM weighting)."""
    px = size["pixels"]
    return TrainConfig(
        mode="LoRA", network_type="lierla", save_lora_name=name, lora_data_directory=str(data),
        image_size=[px, px], image_buckets_step=64, image_min_length=px, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", train_lr_scheduler="constant", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False, train_snr_gamma=0.0,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"], qwen3_max_token_length=QWEN3_TOKENS,
        timestep_sampling="shift", discrete_flow_shift=SHIFT, model_prediction_type="raw")


def zimage_step_loss(transformer: torch.nn.Module, latents: torch.Tensor,
                     captions: list[torch.Tensor]) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand: noise, σ = shift(sigmoid(N(0,1))), the noisy latents as [C, 1, H, W]
    frames at t = 1 − σ, the transformer on the cached captions, its output negated, MSE against noise − x0."""
    b = latents.shape[0]

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        s = torch.sigmoid(torch.randn(b, generator=gen))
        sigma = SHIFT * s / (1.0 + (SHIFT - 1.0) * s)
        sv = sigma.view(-1, 1, 1, 1)
        noisy = (1.0 - sv) * latents + sv * noise
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), 1.0 - sigma, captions, return_dict=False)[0]
        return F.mse_loss(-torch.stack(out).squeeze(2).float(), noise - latents)

    return step_loss


def zimage_bare_loop(transformer: torch.nn.Module, deltas: torch.nn.ModuleList, *, steps: int,
                     latents: torch.Tensor, captions: list[torch.Tensor], lr: float,
                     seed: int) -> tuple[list[float], list[float]]:
    """Z-Image's LoRA step by hand, fresh noise and σ each step, AdamW on the deltas; (wall, cpu) s per step."""
    return bare._timed_loop(transformer, deltas, steps, lr, seed, zimage_step_loss(transformer, latents, captions))


class ZImageBench(Bench):
    """bench/step.py's Bench with the Z-Image model, job and bare loop (bench_algo drives both)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.size = SIZES[args.size]
        self.bundle = zimage_bundle(self.size)
        self.pristine = copy.deepcopy(self.bundle.unet)  # bare copies start from the same weights
        px = self.size["pixels"]
        self.data = make_images(work / "data", size=px)
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        self.runs, self.bare_params = 0, None
        gen = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn((1, 16, px // 8, px // 8), generator=gen)
        ZImage().prepare(self.bundle, self.cfg("lierla", 1), torch.device("cpu"))  # the Qwen3 length
        with torch.no_grad():
            self.captions = [c.detach() for c in caption_list(encode_prompts(self.bundle, [PROMPT]))]

    def cfg(self, algo: str, steps: int, mode: str = "LoRA") -> TrainConfig:
        if algo != "lierla" or mode != "LoRA":
            raise ValueError(f"the Z-Image bench runs lierla in LoRA mode, not {algo} in {mode}")
        self.runs += 1
        return zimage_config(self.data, steps, f"bench-zimage-{self.runs}", self.size)

    def bare_model(self, algo: str):
        made = super().bare_model(algo)  # raises when the parameter counts differ
        self.bare_params = n_params(made[1])
        return made

    def bare_segment(self, unet, deltas, steps: int, seed: int, mode: str = "LoRA"):
        return zimage_bare_loop(unet, deltas, steps=steps, latents=self.latents, captions=self.captions,
                                lr=LEARNING_RATE, seed=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and two rounds (a few minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="steps per segment (quick 12, full 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped per segment (quick 3, full 6)")
    p.add_argument("--rounds", type=int, default=None, help="trainer segments (quick 2, full 4)")
    p.add_argument("--size", choices=tuple(SIZES), default="bench",
                   help="bench: the 4-layer, 384-wide transformer; tiny: a check of the bench itself")
    p.add_argument("--threads", default="auto",
                   help="torch threads; auto = torch's default, or fewer when other work holds a core")
    args = p.parse_args(argv)
    for key, (quick, full) in {"steps": (12, 30), "warmup": (3, 6), "rounds": (2, 4)}.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.steps <= args.warmup:
        p.error("--steps must be more than --warmup")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.lokr_rebuild = False  # Bench.bare_model reads it; LoKr is not part of this bench
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lycoris_logger.setLevel(logging.ERROR)
    threads, why = pick_threads(args.threads)
    torch.set_num_threads(threads)
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-zimage-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")  # CSV logs stay on, outside the repo
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = ZImageBench(args, Path(tmp))
        size, model_params = b.size, n_params(b.bundle.unet)
        tokens, caption_tokens = (size["pixels"] // 16) ** 2, int(b.captions[0].shape[0])
        print(f"Z-Image transformer: {model_params:,} parameters ({size['layers']} layers + {size['refiners']} noise "
              f"and context refiners, {size['heads']} heads of {size['head_dim']}), {size['pixels']}x{size['pixels']} px "
              f"= {tokens} image + {caption_tokens} caption tokens, batch 1, fp32, AdamW, lierla rank {RANK} / alpha "
              f"{ALPHA:g}; torch {torch.__version__}, {threads} threads ({why}); load {load_before}", flush=True)
        r = bench_algo(b, "lierla")
    print(f"\n{'model':6} {'modules':>7} {'net params':>10} {'bare ms':>9} {'trainer ms':>10} {'ratio':>6} "
          f"{'cpu ratio':>9}  wall ratio by round")
    rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
    print(f"{'zimage':6} {r['modules']:7d} {r['network_params']:10d} {r['bare_ms']:9.1f} {r['trainer_ms']:10.1f} "
          f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f}  {rounds}\n")
    summary = {
        "P1": round(r["ratio"], 4), "P1_cpu": round(r["cpu_ratio"], 4),
        "ratios_by_round": [round(x, 4) for x in r["ratios"]],
        "ms_per_step": {"trainer": round(r["trainer_ms"], 1), "bare": round(r["bare_ms"], 1)},
        "cpu_ms_per_step": {"trainer": round(r["trainer_cpu_ms"], 1), "bare": round(r["bare_cpu_ms"], 1)},
        "modules": r["modules"], "network_params": r["network_params"], "bare_params": b.bare_params,
        "check_rel_err": r["check_rel_err"], "algo": "lierla", "rank": RANK, "alpha": ALPHA,
        "model": "z-image-architecture", "size": args.size, "transformer_params": model_params,
        "layers": size["layers"], "refiners": size["refiners"], "heads": size["heads"],
        "head_dim": size["head_dim"], "pixels": size["pixels"], "image_tokens": tokens,
        "caption_tokens": caption_tokens, "timestep_sampling": "shift", "model_prediction_type": "raw",
        **environment(), "threads_why": why,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        "load_avg_start": load_before, "load_avg_end": load_average(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
