"""SD3.5 trainer step time versus a bare PyTorch loop doing the same math (P1's SD3 row).

    python bench/sd3_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random SD3.5-medium-architecture transformer built in code (diffusers'
SD3Transformer2DModel): 4 joint blocks, the first 2 with MMDiT-X's second attention (SD3.5 medium
has it in its first 13 of 24), 6 heads of 64 (384 wide), q/k RMS norm; 256 px images give 32x32
latents, 2x2 patches, 256 image tokens, next to 77 CLIP and 64 T5 tokens. The text encoders and the
autoencoder are the tests' tiny ones: with cached latents and captions they run before training only.

As bench/step.py and bench/flux_step.py, in one process and interleaved to cancel drift: bare,
trainer, bare, ..., bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA
mode, lierla, BASE off, cached latents and captions, weighting_scheme uniform, training_shift 3,
constant LR, AdamW, fp32, batch 1). The bare side (`sd3_bare_loop`) draws σ as sd-scripts does
(u ~ U(0,1), shifted, t = floor(u'·1000), σ = t/1000), noises the latents, runs the transformer
at t on the cached conditioning, takes output·(−σ) + noisy input, the MSE against x0, and steps
AdamW on plain LoRA deltas (bench/bare.py) hooked into the same Linear modules;
`check_same_math` verifies that those deltas compute LyCORIS's output. A round's ratio is the
trainer's median ms/step over the mean of the bare medians just before and after it; P1 is the
median over the rounds. The last line of output is one JSON object.
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
from diffusers import SD3Transformer2DModel  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import (LEARNING_RATE, SEED, environment, load_average, make_images,  # noqa: E402
                          n_params)
from bench.step import Bench, bench_algo, pick_threads  # noqa: E402
from tests.flux_tiny import tiny_t5_tokenizer  # noqa: E402
from tests.sd3_tiny import tiny_sd3_parts  # noqa: E402
from trainer.config.schema import BLOCK_IDS, TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.sd3 import SD3  # noqa: E402
from trainer.families.sd3_load import sd3_scheduler  # noqa: E402
from trainer.families.textenc import encode_prompts  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

RANK, ALPHA = 16, 8.0
SHIFT = 3.0  # training_shift
PROMPT = "pattern 0, checkers"
# SD3.5 medium has 24 joint blocks (MMDiT-X in 0-12), 24 heads of 64 (1536 wide); "bench" keeps its
# shape at 1/6 of the depth and 1/4 of the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"blocks": 4, "dual": (0, 1), "heads": 6, "head_dim": 64, "t5_tokens": 64, "pixels": 256},
    "tiny": {"blocks": 2, "dual": (0,), "heads": 2, "head_dim": 16, "t5_tokens": 8, "pixels": 64},
}


def sd3_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """An SD3.5 bundle: the transformer of `size`, the tests' tiny CLIP-L/CLIP-G/T5/autoencoder; frozen, fp32."""
    parts = tiny_sd3_parts("5-medium", seed=seed)
    t5 = parts["t5xxl"]
    width = size["heads"] * size["head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=size["pixels"] // 8, patch_size=2, in_channels=16, num_layers=size["blocks"],
        attention_head_dim=size["head_dim"], num_attention_heads=size["heads"], joint_attention_dim=t5.config.d_model,
        caption_projection_dim=width, pooled_projection_dim=2 * parts["clip_l"].config.projection_dim,
        out_channels=16, pos_embed_max_size=size["pixels"] // 16, dual_attention_layers=size["dual"],
        qk_norm="rms_norm")
    bundle = ModelBundle(family="sd3", unet=transformer, vae=parts["vae"],
                         text_encoders=[parts["clip_l"], parts["clip_g"], t5],
                         tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), tiny_t5_tokenizer()],
                         noise_scheduler=sd3_scheduler(), name="bench-sd3", source="memory",
                         extra={"sd3_variant": "5-medium"})
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def sd3_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """LoRA mode, lierla rank 16 / alpha 8, BASE off (cached captions), fp32, AdamW at a constant LR, batch 1;
    weighting uniform, training_shift 3, no min-SNR; split_qkv on, so each of q, k, v has its own down
    as in the bare loop."""
    px = size["pixels"]
    return TrainConfig(
        mode="LoRA", network_type="lierla", save_lora_name=name, lora_data_directory=str(data),
        image_size=[px, px], image_buckets_step=64, image_min_length=px, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", train_lr_scheduler="constant", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False, train_snr_gamma=0.0,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"], t5xxl_max_token_length=size["t5_tokens"],
        weighting_scheme="uniform", training_shift=SHIFT, split_qkv=True)


def sd3_step_loss(transformer: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                  pooled: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand, as sd-scripts' sd3_train_network.py computes it."""
    b = latents.shape[0]

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        u = torch.rand(b, generator=gen)
        u = SHIFT * u / (1.0 + (SHIFT - 1.0) * u)
        t = (u * 1000).long().clamp(min=1).float()
        sigma = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        out = transformer(hidden_states=noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                          timestep=t, return_dict=False)[0]
        return F.mse_loss((out * (-sigma) + noisy).float(), latents)

    return step_loss


def sd3_bare_loop(transformer: torch.nn.Module, deltas: torch.nn.ModuleList, *, steps: int,
                  latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, lr: float,
                  seed: int) -> tuple[list[float], list[float]]:
    """SD3's LoRA step by hand, fresh noise and σ each step, AdamW on the deltas; (wall, cpu) s per step."""
    return bare._timed_loop(transformer, deltas, steps, lr, seed, sd3_step_loss(transformer, latents, hidden, pooled))


class SD3Bench(Bench):
    """bench/step.py's Bench with the SD3 model, job and bare loop (bench_algo drives both)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.size = SIZES[args.size]
        self.bundle = sd3_bundle(self.size)
        self.pristine = copy.deepcopy(self.bundle.unet)  # bare copies start from the same weights
        px = self.size["pixels"]
        self.data = make_images(work / "data", size=px)
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        self.runs, self.bare_params = 0, None
        gen = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn((1, 16, px // 8, px // 8), generator=gen)
        SD3().prepare(self.bundle, self.cfg("lierla", 1), torch.device("cpu"))  # T5 length for the cached prompt
        with torch.no_grad():
            cond = encode_prompts(self.bundle, [PROMPT])
        self.hidden, self.pooled = cond.hidden.detach(), cond.pooled.detach()

    def cfg(self, algo: str, steps: int, mode: str = "LoRA") -> TrainConfig:
        if algo != "lierla" or mode != "LoRA":
            raise ValueError(f"the SD3 bench runs lierla in LoRA mode, not {algo} in {mode}")
        self.runs += 1
        return sd3_config(self.data, steps, f"bench-sd3-{self.runs}", self.size)

    def bare_model(self, algo: str):
        made = super().bare_model(algo)  # raises when the parameter counts differ
        self.bare_params = n_params(made[1])
        return made

    def bare_segment(self, unet, deltas, steps: int, seed: int, mode: str = "LoRA"):
        return sd3_bare_loop(unet, deltas, steps=steps, latents=self.latents, hidden=self.hidden,
                             pooled=self.pooled, lr=LEARNING_RATE, seed=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and two rounds (a few minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="steps per segment (quick 12, full 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped per segment (quick 3, full 6)")
    p.add_argument("--rounds", type=int, default=None, help="trainer segments (quick 2, full 4)")
    p.add_argument("--size", choices=tuple(SIZES), default="bench",
                   help="bench: the SD3.5-medium-shaped transformer; tiny: a check of the bench itself")
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
    with tempfile.TemporaryDirectory(prefix="bench-sd3-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")  # CSV logs stay on, outside the repo
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = SD3Bench(args, Path(tmp))
        size, model_params = b.size, n_params(b.bundle.unet)
        tokens = (size["pixels"] // 16) ** 2
        print(f"SD3 transformer: {model_params:,} parameters ({size['blocks']} joint blocks, MMDiT-X attention in "
              f"{len(size['dual'])}, {size['heads']} heads of {size['head_dim']}), {size['pixels']}x{size['pixels']} px = "
              f"{tokens} image + {77 + size['t5_tokens']} text tokens, batch 1, fp32, AdamW, lierla rank {RANK} / alpha "
              f"{ALPHA:g}; torch {torch.__version__}, {threads} threads ({why}); load {load_before}", flush=True)
        r = bench_algo(b, "lierla")
    print(f"\n{'model':6} {'modules':>7} {'net params':>10} {'bare ms':>9} {'trainer ms':>10} {'ratio':>6} "
          f"{'cpu ratio':>9}  wall ratio by round")
    rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
    print(f"{'sd3':6} {r['modules']:7d} {r['network_params']:10d} {r['bare_ms']:9.1f} {r['trainer_ms']:10.1f} "
          f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f}  {rounds}\n")
    summary = {
        "P1": round(r["ratio"], 4), "P1_cpu": round(r["cpu_ratio"], 4),
        "ratios_by_round": [round(x, 4) for x in r["ratios"]],
        "ms_per_step": {"trainer": round(r["trainer_ms"], 1), "bare": round(r["bare_ms"], 1)},
        "cpu_ms_per_step": {"trainer": round(r["trainer_cpu_ms"], 1), "bare": round(r["bare_cpu_ms"], 1)},
        "modules": r["modules"], "network_params": r["network_params"], "bare_params": b.bare_params,
        "check_rel_err": r["check_rel_err"], "algo": "lierla", "rank": RANK, "alpha": ALPHA,
        "model": "sd3.5-medium-architecture", "size": args.size, "transformer_params": model_params,
        "joint_blocks": size["blocks"], "dual_attention_blocks": len(size["dual"]), "heads": size["heads"],
        "head_dim": size["head_dim"], "pixels": size["pixels"], "image_tokens": tokens,
        "text_tokens": 77 + size["t5_tokens"], "weighting_scheme": "uniform", "training_shift": SHIFT,
        **environment(), "threads_why": why,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        "load_avg_start": load_before, "load_avg_end": load_average(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
