"""FLUX.1 trainer step time versus a bare PyTorch loop doing the same math (P1's FLUX row).

    python bench/flux_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random FLUX.1-dev-architecture transformer built in code (diffusers'
FluxTransformer2DModel): 3 double + 6 single blocks, 6 heads of 64 (384 wide, 30.3M parameters),
FLUX.1's rotary split at that head size; 256 px images give 32x32 latents, packed 2x2 into 256
image tokens, next to 64 T5 tokens. The text encoders and the autoencoder are the tests' tiny
ones: with cached latents and captions they run before training only.

As bench/step.py, in one process and interleaved to cancel drift: bare, trainer, bare, ...,
bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA mode, lierla,
BASE off, cached latents and captions, timestep_sampling shift, model_prediction_type raw,
constant LR, AdamW, fp32, batch 1). The bare side (`flux_bare_loop`) packs the latents, draws
σ = shift(sigmoid(N(0,1))), noises them, runs the transformer on the cached T5/CLIP
conditioning, unpacks, takes the MSE against noise - x0, and steps AdamW on plain LoRA deltas
(bench/bare.py) hooked into the same Linear modules; `check_same_math` verifies that those
deltas compute LyCORIS's output. A round's ratio is the trainer's median ms/step over the mean
of the bare medians just before and after it; P1 is the median over the rounds.
The last line of output is one JSON object.
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
from diffusers import FluxTransformer2DModel  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import (LEARNING_RATE, SEED, environment, load_average, make_images,  # noqa: E402
                          n_params)
from bench.step import Bench, bench_algo, pick_threads  # noqa: E402
from tests.flux_tiny import tiny_flux_ae, tiny_t5, tiny_t5_tokenizer  # noqa: E402
from tests.tiny import tiny_text_config  # noqa: E402
from trainer.config.schema import BLOCK_IDS, TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.flux import Flux, image_ids, pack, unpack  # noqa: E402
from trainer.families.flux_load import flux_scheduler  # noqa: E402
from trainer.families.textenc import encode_prompts  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

RANK, ALPHA = 16, 8.0
SHIFT = 3.1582        # discrete_flow_shift's default
GUIDANCE = 1.0        # guidance_scale's default (dev's guidance input)
PROMPT = "pattern 0, checkers"
# Transformer sizes. FLUX.1 has 19 double + 38 single blocks, 24 heads of 128 (3072 wide), rotary
# axes 16/56/56 (1/8 of the head, then halves); "bench" keeps that shape at 1/8 of the depth and
# 1/8 of the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"double": 3, "single": 6, "heads": 6, "head_dim": 64, "axes": (8, 28, 28), "t5_tokens": 64, "pixels": 256},
    "tiny": {"double": 1, "single": 1, "heads": 2, "head_dim": 32, "axes": (4, 14, 14), "t5_tokens": 8, "pixels": 64},
}


def flux_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """A FLUX.1-dev bundle: the transformer of `size`, tiny CLIP-L/T5/autoencoder; frozen, fp32, eval mode."""
    torch.manual_seed(seed)
    clip, t5 = CLIPTextModel(tiny_text_config()), tiny_t5()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=size["double"], num_single_layers=size["single"],
        attention_head_dim=size["head_dim"], num_attention_heads=size["heads"],
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=True, axes_dims_rope=size["axes"])
    bundle = ModelBundle(family="flux", unet=transformer, vae=tiny_flux_ae(), text_encoders=[clip, t5],
                         tokenizers=[clip_tokenizer("<|endoftext|>"), tiny_t5_tokenizer()],
                         noise_scheduler=flux_scheduler("dev"), name="bench-flux", source="memory")
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def flux_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """LoRA mode, lierla rank 16 / alpha 8, BASE off (cached captions), fp32, AdamW at a constant LR, batch 1;
    σ by shift, raw prediction, no min-SNR (a DDPM weighting); split_qkv on, so each of q, k, v has its
    own down as in the bare loop (shared downs do the same matmuls)."""
    px = size["pixels"]
    return TrainConfig(
        mode="LoRA", network_type="lierla", save_lora_name=name, lora_data_directory=str(data),
        image_size=[px, px], image_buckets_step=64, image_min_length=px, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", train_lr_scheduler="constant", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False, train_snr_gamma=0.0,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"],
        t5xxl_max_token_length=size["t5_tokens"], timestep_sampling="shift", discrete_flow_shift=SHIFT,
        model_prediction_type="raw", guidance_scale=GUIDANCE, split_qkv=True)


def flux_step_loss(transformer: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                   pooled: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand: noise, σ = shift(sigmoid(N(0,1))), the noisy latents packed into
    tokens, the transformer on the cached conditioning, unpacked, MSE against noise - x0."""
    b, _, h, w = latents.shape
    img_ids = image_ids(h, w, latents.device, latents.dtype)  # the same each step: made once
    txt_ids = torch.zeros(hidden.shape[1], 3)
    guidance = torch.full((b,), GUIDANCE)

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        s = torch.sigmoid(torch.randn(b, generator=gen))
        sigma = SHIFT * s / (1.0 + (SHIFT - 1.0) * s)
        sv = sigma.view(-1, 1, 1, 1)
        noisy = (1.0 - sv) * latents + sv * noise
        out = transformer(hidden_states=pack(noisy), encoder_hidden_states=hidden, pooled_projections=pooled,
                          timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                          return_dict=False)[0]
        return F.mse_loss(unpack(out, h, w).float(), noise - latents)

    return step_loss


def flux_bare_loop(transformer: torch.nn.Module, deltas: torch.nn.ModuleList, *, steps: int,
                   latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, lr: float,
                   seed: int) -> tuple[list[float], list[float]]:
    """FLUX's LoRA step by hand, fresh noise and σ each step, AdamW on the deltas; (wall, cpu) s per step."""
    step_loss = flux_step_loss(transformer, latents, hidden, pooled)
    return bare._timed_loop(transformer, deltas, steps, lr, seed, step_loss)


class FluxBench(Bench):
    """bench/step.py's Bench with the FLUX model, job and bare loop (bench_algo drives both)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.size = SIZES[args.size]
        self.bundle = flux_bundle(self.size)
        self.pristine = copy.deepcopy(self.bundle.unet)  # bare copies start from the same weights
        px = self.size["pixels"]
        self.data = make_images(work / "data", size=px)
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        self.runs, self.bare_params = 0, None
        gen = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn((1, 16, px // 8, px // 8), generator=gen)
        Flux().prepare(self.bundle, self.cfg("lierla", 1), torch.device("cpu"))  # T5 length for the cached prompt
        with torch.no_grad():
            cond = encode_prompts(self.bundle, [PROMPT])
        self.hidden, self.pooled = cond.hidden.detach(), cond.pooled.detach()

    def cfg(self, algo: str, steps: int, mode: str = "LoRA") -> TrainConfig:
        if algo != "lierla" or mode != "LoRA":
            raise ValueError(f"the FLUX bench runs lierla in LoRA mode, not {algo} in {mode}")
        self.runs += 1
        return flux_config(self.data, steps, f"bench-flux-{self.runs}", self.size)

    def bare_model(self, algo: str):
        made = super().bare_model(algo)  # raises when the parameter counts differ
        self.bare_params = n_params(made[1])
        return made

    def bare_segment(self, unet, deltas, steps: int, seed: int, mode: str = "LoRA"):
        return flux_bare_loop(unet, deltas, steps=steps, latents=self.latents, hidden=self.hidden,
                              pooled=self.pooled, lr=LEARNING_RATE, seed=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and two rounds (a few minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="steps per segment (quick 12, full 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped per segment (quick 3, full 6)")
    p.add_argument("--rounds", type=int, default=None, help="trainer segments (quick 2, full 4)")
    p.add_argument("--size", choices=tuple(SIZES), default="bench",
                   help="bench: the 30.3M-parameter transformer; tiny: a check of the bench itself")
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
    with tempfile.TemporaryDirectory(prefix="bench-flux-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")  # CSV logs stay on, outside the repo
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = FluxBench(args, Path(tmp))
        size, model_params = b.size, n_params(b.bundle.unet)
        tokens = (size["pixels"] // 16) ** 2
        print(f"FLUX transformer: {model_params:,} parameters ({size['double']} double + {size['single']} single "
              f"blocks, {size['heads']} heads of {size['head_dim']}), {size['pixels']}x{size['pixels']} px = "
              f"{tokens} image + {size['t5_tokens']} T5 tokens, batch 1, fp32, AdamW, lierla rank {RANK} / alpha "
              f"{ALPHA:g}; torch {torch.__version__}, {threads} threads ({why}); load {load_before}", flush=True)
        r = bench_algo(b, "lierla")
    print(f"\n{'model':6} {'modules':>7} {'net params':>10} {'bare ms':>9} {'trainer ms':>10} {'ratio':>6} "
          f"{'cpu ratio':>9}  wall ratio by round")
    rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
    print(f"{'flux':6} {r['modules']:7d} {r['network_params']:10d} {r['bare_ms']:9.1f} {r['trainer_ms']:10.1f} "
          f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f}  {rounds}\n")
    summary = {
        "P1": round(r["ratio"], 4), "P1_cpu": round(r["cpu_ratio"], 4),
        "ratios_by_round": [round(x, 4) for x in r["ratios"]],
        "ms_per_step": {"trainer": round(r["trainer_ms"], 1), "bare": round(r["bare_ms"], 1)},
        "cpu_ms_per_step": {"trainer": round(r["trainer_cpu_ms"], 1), "bare": round(r["bare_cpu_ms"], 1)},
        "modules": r["modules"], "network_params": r["network_params"], "bare_params": b.bare_params,
        "check_rel_err": r["check_rel_err"], "algo": "lierla", "rank": RANK, "alpha": ALPHA,
        "model": "flux1-dev-architecture", "size": args.size, "transformer_params": model_params,
        "double_blocks": size["double"], "single_blocks": size["single"], "heads": size["heads"],
        "head_dim": size["head_dim"], "pixels": size["pixels"], "image_tokens": tokens,
        "t5_tokens": size["t5_tokens"], "timestep_sampling": "shift", "model_prediction_type": "raw",
        **environment(), "threads_why": why,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        "load_avg_start": load_before, "load_avg_end": load_average(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
