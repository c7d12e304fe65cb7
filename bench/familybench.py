"""What the family P1 benches (bench/flux_step.py, sd3_step.py, zimage_step.py) share.

Each of them times the engine's LoRA job (lierla rank 16 / alpha 8, batch 1, fp32, AdamW) on a
random transformer built in code against a bare loop doing the same math, interleaved as
bench/step.py does. A bench subclasses `FamilyBench` with its model, job and bare step's loss,
and takes its `parse_args` and `main` from `entry_points`: the options, the table row and the
JSON line's common keys come from here, so the three stay alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from lycoris.logging import logger as lycoris_logger

from bench import bare
from bench.common import LEARNING_RATE, SEED, environment, load_average, make_images, n_params
from bench.step import Bench, bench_algo, pick_threads
from trainer.config.schema import BLOCK_IDS, TrainConfig
from trainer.families.bundle import ModelBundle
from trainer.families.textenc import encode_prompts

RANK, ALPHA = 16, 8.0
PROMPT = "pattern 0, checkers"
# (quick, full) defaults of the segment options
DEFAULTS = {"steps": (12, 30), "warmup": (3, 6), "rounds": (2, 4)}


class FamilyBench(Bench):
    """bench/step.py's Bench with a family's model, job and bare loop (bench_algo drives both).

    A subclass sets `label` (the table row, folder and LoRA names), `title` (for errors), `model`
    (the JSON's "model"), `sizes`, `heading` (the model part of the first line, formatted with the
    size's, `fields`' and the counts' keys), `size_help` (what --size bench is), and as static
    methods `make_bundle(size)`, `make_config(data, steps, name, size)` and
    `loss_fn(transformer, latents, *inputs)` (the bare step's loss); it defines `fields`, and
    `bare_inputs` where the loss takes other inputs than (hidden, pooled).
    """

    label: str
    title: str
    model: str
    sizes: dict[str, dict]
    heading: str
    size_help: str
    make_bundle: Callable[[dict], ModelBundle]
    make_config: Callable[[Path, int, str, dict], TrainConfig]
    loss_fn: Callable[..., Callable[[torch.Generator], torch.Tensor]]

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.size = self.sizes[args.size]
        self.bundle = self.make_bundle(self.size)
        self.pristine = copy.deepcopy(self.bundle.unet)  # bare copies start from the same weights
        px = self.size["pixels"]
        self.data = make_images(work / "data", size=px)
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        self.runs, self.bare_params = 0, None
        gen = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn((1, 16, px // 8, px // 8), generator=gen)
        # the family's prepare (a fresh instance of the bundle's family class) sets the text length
        # the cached prompt is encoded at
        type(self.bundle.family)().prepare(self.bundle, self.cfg("lierla", 1), torch.device("cpu"))
        with torch.no_grad():
            self.inputs = self.bare_inputs(encode_prompts(self.bundle, [PROMPT]))

    def bare_inputs(self, cond) -> tuple:
        """What the bare step's loss takes of the prompt's encoding, after the latents (detached):
        here the text sequence and the pooled vector, as FLUX's and SD3's transformers take them."""
        return cond.hidden.detach(), cond.pooled.detach()

    def fields(self) -> tuple[dict, dict]:
        """The JSON's family keys: those before "heads" (depth) and those after "image_tokens"."""
        raise NotImplementedError

    def describe(self, model_params: int, tokens: int) -> str:
        """The first line's model part: `heading` filled in."""
        depth, after = self.fields()
        return self.heading.format(**{**self.size, **depth, **after}, params=model_params, image_tokens=tokens)

    def cfg(self, algo: str, steps: int, mode: str = "LoRA") -> TrainConfig:
        if algo != "lierla" or mode != "LoRA":
            raise ValueError(f"the {self.title} bench runs lierla in LoRA mode, not {algo} in {mode}")
        self.runs += 1
        return self.make_config(self.data, steps, f"bench-{self.label}-{self.runs}", self.size)

    def bare_model(self, algo: str):
        made = super().bare_model(algo)  # raises when the parameter counts differ
        self.bare_params = n_params(made[1])
        return made

    def bare_segment(self, unet, deltas, steps: int, seed: int, mode: str = "LoRA"):
        """The family's LoRA step by hand, fresh noise and σ each step, AdamW on the deltas; (wall, cpu) s per step."""
        step_loss = self.loss_fn(unet, self.latents, *self.inputs)
        return bare._timed_loop(unet, deltas, steps, LEARNING_RATE, seed, step_loss)


def lierla_job(data: Path, steps: int, name: str, size: dict) -> dict:
    """TrainConfig's common keys: LoRA mode, lierla rank 16 / alpha 8, BASE off (cached captions), fp32,
    AdamW at a constant LR, batch 1, no min-SNR (a DDPM weighting)."""
    px = size["pixels"]
    return dict(
        mode="LoRA", network_type="lierla", save_lora_name=name, lora_data_directory=str(data),
        image_size=[px, px], image_buckets_step=64, image_min_length=px, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", train_lr_scheduler="constant", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False, train_snr_gamma=0.0,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"])


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow models' timestep shift of t in (0, 1): shift·t / (1 + (shift − 1)·t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow models' noisy input (1 − σ)·x0 + σ·noise, one σ per image."""
    sv = sigma.view(-1, 1, 1, 1)
    return (1.0 - sv) * latents + sv * noise


def parse_args(doc: str, sizes: dict, size_help: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The family benches' options; `doc` is the bench's module docstring, `size_help` says what "bench" is."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and two rounds (a few minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="steps per segment (quick 12, full 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped per segment (quick 3, full 6)")
    p.add_argument("--rounds", type=int, default=None, help="trainer segments (quick 2, full 4)")
    p.add_argument("--size", choices=tuple(sizes), default="bench",
                   help=f"bench: {size_help}; tiny: a check of the bench itself")
    p.add_argument("--threads", default="auto",
                   help="torch threads; auto = torch's default, or fewer when other work holds a core")
    args = p.parse_args(argv)
    for key, (quick, full) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.steps <= args.warmup:
        p.error("--steps must be more than --warmup")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.lokr_rebuild = args.loha_recompute = False  # Bench.bare_model reads them; LoKr/LoHa are not benched here
    return args


def print_row(label: str, r: dict) -> None:
    """The one-row table: bench_algo's figures under the family's label."""
    print(f"\n{'model':6} {'modules':>7} {'net params':>10} {'bare ms':>9} {'trainer ms':>10} {'ratio':>6} "
          f"{'cpu ratio':>9}  wall ratio by round")
    rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
    print(f"{label:6} {r['modules']:7d} {r['network_params']:10d} {r['bare_ms']:9.1f} {r['trainer_ms']:10.1f} "
          f"{r['ratio']:6.3f} {r['cpu_ratio']:9.3f}  {rounds}\n")


def summarize(b: FamilyBench, r: dict, model_params: int, tokens: int, why: str) -> dict:
    """The JSON line without its closing run keys (options, load averages, wall time)."""
    size, (depth, after) = b.size, b.fields()
    return {
        "P1": round(r["ratio"], 4), "P1_cpu": round(r["cpu_ratio"], 4),
        "ratios_by_round": [round(x, 4) for x in r["ratios"]],
        "ms_per_step": {"trainer": round(r["trainer_ms"], 1), "bare": round(r["bare_ms"], 1)},
        "cpu_ms_per_step": {"trainer": round(r["trainer_cpu_ms"], 1), "bare": round(r["bare_cpu_ms"], 1)},
        "modules": r["modules"], "network_params": r["network_params"], "bare_params": b.bare_params,
        "check_rel_err": r["check_rel_err"], "algo": "lierla", "rank": RANK, "alpha": ALPHA,
        "model": b.model, "size": b.args.size, "transformer_params": model_params, **depth,
        "heads": size["heads"], "head_dim": size["head_dim"], "pixels": size["pixels"], "image_tokens": tokens,
        **after, **environment(), "threads_why": why,
    }


def run_family_bench(bench_cls: type[FamilyBench], args: argparse.Namespace) -> dict:
    """A family bench's whole run: threads, a temporary folder for data and logs, the heading, the
    interleaved segments, the table row and the JSON line (printed last and returned)."""
    lycoris_logger.setLevel(logging.ERROR)  # its per-layer notices drown the table
    threads, why = pick_threads(args.threads)
    torch.set_num_threads(threads)
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix=f"bench-{bench_cls.label}-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")  # CSV logs stay on, outside the repo
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = bench_cls(args, Path(tmp))
        model_params, tokens = n_params(b.bundle.unet), (b.size["pixels"] // 16) ** 2
        print(f"{b.describe(model_params, tokens)}, batch 1, fp32, AdamW, lierla rank {RANK} / alpha {ALPHA:g}; "
              f"torch {torch.__version__}, {threads} threads ({why}); load {load_before}", flush=True)
        r = bench_algo(b, "lierla")
    print_row(bench_cls.label, r)
    summary = summarize(b, r, model_params, tokens, why)
    summary.update({key: getattr(args, key) for key in ("steps", "warmup", "rounds", "quick")})
    summary.update(load_avg_start=load_before, load_avg_end=load_average(),
                   wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps(summary))
    return summary


def entry_points(bench_cls: type[FamilyBench], doc: str) -> tuple[Callable, Callable]:
    """A bench module's `parse_args(argv)` and `main(argv)`; `doc` is the module's docstring."""

    def bench_parse_args(argv: list[str] | None = None) -> argparse.Namespace:
        return parse_args(doc, bench_cls.sizes, bench_cls.size_help, argv)

    def bench_main(argv: list[str] | None = None) -> dict:
        return run_family_bench(bench_cls, bench_parse_args(argv))

    return bench_parse_args, bench_main
