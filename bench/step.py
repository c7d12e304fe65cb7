"""Trainer step time versus a bare PyTorch loop doing the same math, as ratios from one run.

    python bench/step.py [--quick] [--algos lierla,c3lier,loha,lokr] [--steps N] [--rounds R]
                         [--threads N] [--vae small|sd] [--no-p2] [--no-startup] [--no-ileco]
                         [--model bench|sd15]

For each algo (and for iLECO with lierla) it runs, in one process and interleaved to cancel drift:
bare, trainer, bare, trainer, ..., bare. The trainer side is the real engine
(`Trainer(cfg, host).run()`, LoRA mode, BASE off); the bare side is bench/bare.py.
The iLECO row compares the engine's iLECO mode with a bare loop doing the same two
forwards (the first with the deltas switched off, under no_grad) and one backward.
The ratio of a round is the trainer's median ms/step over the mean of the bare
medians just before and after it; P1 is the median of the rounds' ratios.
P2 (bench/p2.py) sets the trainer's steps/s against a peft reference loop that
VAE-encodes each step (bench/reference.py; needs peft, else "P2": null and why);
bench/startup.py adds the start-up split and peak RSS from a fresh process.
`--model sd15` swaps in SD1.5's own architecture at its real size (random weights, still
256 px; slow on a CPU, so pair it with few --algos and steps) to check that the bench
model's cost profile is SD1.5's; start-up is not measured then.
The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402

from bench import bare, startup  # noqa: E402
from bench.p2 import bench_p2  # noqa: E402
from bench.common import (ALGOS, LEARNING_RATE, PIXELS, SEED, BenchHost, StepClock,  # noqa: E402
                          bench_bundle, bench_config, busy_cores, environment, load_average, median_ms,
                          make_images, n_params, steady)
from trainer.training.engine import Trainer  # noqa: E402
from trainer.networks.network import Network  # noqa: E402
from trainer.families.textenc import encode_prompts  # noqa: E402

ILECO_PROMPTS = ("pattern 0, checkers", "")  # erase: toward the empty prompt


class Bench:
    """One benchmark run: the model, data, a pristine U-Net copy and the output folder."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        if getattr(args, "model", "bench") == "sd15":
            from bench.gpu import sd15_bundle

            self.bundle = sd15_bundle()
        else:
            self.bundle = bench_bundle(vae=getattr(args, "vae", "scaled"))
        self.pristine = copy.deepcopy(self.bundle.unet)  # bare copies start from the same weights
        self.data = make_images(work / "data")
        self.lora_dir = work / "lora"
        self.lora_dir.mkdir()
        gen = torch.Generator().manual_seed(SEED)
        self.latents = torch.randn((1, 4, PIXELS // 8, PIXELS // 8), generator=gen)
        with torch.no_grad():
            self.cond = encode_prompts(self.bundle, ["pattern 0, checkers"]).hidden.detach()
            both = encode_prompts(self.bundle, list(ILECO_PROMPTS)).hidden.detach()
            self.ileco_conds = (both[:1], both[1:])
        self.runs = 0

    def cfg(self, algo: str, steps: int, mode: str = "LoRA"):
        self.runs += 1
        cfg = bench_config(algo, self.data, steps, f"bench-{mode}-{algo}-{self.runs}")
        if mode == "iLECO":
            cfg = cfg.with_overrides({"mode": "iLECO", "original prompt": ILECO_PROMPTS[0],
                                      "target prompt": ILECO_PROMPTS[1]})
        return cfg

    def bare_model(self, algo: str) -> tuple[torch.nn.Module, torch.nn.ModuleList, int, int, float]:
        """A copy of the U-Net with bare deltas on exactly the layers the trainer's network targets."""
        network = Network.build(self.bundle, self.cfg(algo, 1))
        try:
            names = {id(m): name for name, m in self.bundle.unet.named_modules()}
            targets = [(names[id(m.org_module[0])], m) for m in network.unet_modules]
            unet = copy.deepcopy(self.pristine)
            deltas = bare.attach(unet, algo, targets, rebuild_lokr=self.args.lokr_rebuild,
                                 recompute_loha=self.args.loha_recompute)
            worst = bare.check_same_math(deltas, targets)
            if sum(p.numel() for p in deltas.parameters()) != network.n_params:
                raise RuntimeError(f"{algo}: bare and LyCORIS parameter counts differ")
            return unet, deltas, len(targets), network.n_params, worst
        finally:
            network.remove()

    def trainer_segment(self, algo: str, steps: int, mode: str = "LoRA") -> tuple[list[float], list[float]]:
        clock = StepClock()
        result = Trainer(self.cfg(algo, steps, mode), BenchHost(self.bundle, self.lora_dir),
                         device=torch.device("cpu"), listeners=[clock]).run()
        if result.status != "done" or result.steps != steps:
            raise RuntimeError(f"trainer run ended {result.status} after {result.steps} steps")
        return clock.durations()

    def bare_segment(self, unet, deltas, steps: int, seed: int, mode: str = "LoRA") -> tuple[list[float], list[float]]:
        if mode == "iLECO":
            return bare.bare_ileco_loop(unet, deltas, steps=steps, shape=tuple(self.latents.shape),
                                        cond_orig=self.ileco_conds[0], cond_targ=self.ileco_conds[1],
                                        alphas_cumprod=self.bundle.noise_scheduler.alphas_cumprod,
                                        snr_gamma=5.0, lr=LEARNING_RATE, seed=seed)
        return bare.bare_loop(unet, deltas, steps=steps, latents=self.latents, cond=self.cond,
                              alphas_cumprod=self.bundle.noise_scheduler.alphas_cumprod,
                              snr_gamma=5.0, lr=LEARNING_RATE, seed=seed)


def _medians(times: tuple[list[float], list[float]], warmup: int) -> tuple[float, float]:
    """(wall, cpu) median ms/step of a segment's steady steps."""
    return median_ms(steady(times[0], warmup)), median_ms(steady(times[1], warmup))


def _ratios(trainer: list[float], bare_ms: list[float]) -> list[float]:
    """Each trainer segment over the mean of the bare segments just before and after it."""
    return [t / ((bare_ms[i] + bare_ms[i + 1]) / 2) for i, t in enumerate(trainer)]


def bench_algo(b: Bench, algo: str, mode: str = "LoRA") -> dict:
    """bare, trainer, bare, ... for one algo (and mode); per-round ratios against the neighbouring bare medians."""
    a = b.args
    label = algo if mode == "LoRA" else mode.lower()
    unet, deltas, n_mod, n_net, worst = b.bare_model(algo)
    if worst > 1e-4:
        raise RuntimeError(f"{algo}: bare delta differs from LyCORIS's by {worst:.2e} (relative)")
    bare_seg = [_medians(b.bare_segment(unet, deltas, a.steps, SEED, mode), a.warmup)]
    trainer_seg = []
    for r in range(a.rounds):
        trainer_seg.append(_medians(b.trainer_segment(algo, a.steps, mode), a.warmup))
        bare_seg.append(_medians(b.bare_segment(unet, deltas, a.steps, SEED + r + 1, mode), a.warmup))
        print(f"  {label} round {r + 1}: bare {bare_seg[-2][0]:.1f} | trainer {trainer_seg[-1][0]:.1f} | "
              f"bare {bare_seg[-1][0]:.1f} ms/step (wall); cpu {bare_seg[-2][1]:.1f} | "
              f"{trainer_seg[-1][1]:.1f} | {bare_seg[-1][1]:.1f}", flush=True)
    wall = _ratios([t[0] for t in trainer_seg], [x[0] for x in bare_seg])
    cpu = _ratios([t[1] for t in trainer_seg], [x[1] for x in bare_seg])
    return {"ratio": statistics.median(wall), "ratios": wall, "cpu_ratio": statistics.median(cpu),
            "trainer_ms": statistics.median(t[0] for t in trainer_seg),
            "bare_ms": statistics.median(x[0] for x in bare_seg),
            "trainer_cpu_ms": statistics.median(t[1] for t in trainer_seg),
            "bare_cpu_ms": statistics.median(x[1] for x in bare_seg),
            "modules": n_mod, "network_params": n_net, "check_rel_err": worst}


def print_table(results: dict[str, dict]) -> None:
    print()
    print(f"{'algo':8} {'modules':>7} {'net params':>10} {'bare ms':>9} {'trainer ms':>10} {'ratio':>6} "
          f"{'cpu ratio':>9}  wall ratio by round")
    for algo, r in results.items():
        rounds = " ".join(f"{x:.3f}" for x in r["ratios"])
        print(f"{algo:8} {r['modules']:7d} {r['network_params']:10d} {r['bare_ms']:9.1f} "
              f"{r['trainer_ms']:10.1f} {r['ratio']:6.3f} {r['cpu_ratio']:9.3f}  {rounds}")
    print()


def print_extras(p2: dict, start: dict) -> None:
    """P2 and the start-up/memory figures, when measured."""
    if p2.get("P2") is not None:
        ms = p2["P2_ms_per_step"]
        print(f"P2 (trainer steps/s over peft's): {p2['P2']:.3f} against attention-only peft "
              f"({ms['peft_attention']} ms/step), {p2['P2_same_layers']:.3f} against peft on the trainer's layers "
              f"({ms['peft_same']} ms/step); trainer {ms['trainer']} ms/step")
    elif p2:
        print(f"P2: not measured ({p2['P2_reason']})")
    if start:
        print(f"start-up: load {start['load_s']} s, build {start['build_s']} s, cache {start['cache_s']} s "
              f"({start['cache_per_image_s']} s/image), first step {start['first_step_s']} s; peak RSS in training "
              f"{start['peak_rss_training_bytes'] / 2**20:.0f} MiB = {start['peak_rss_training_over_model']}x the model "
              f"({start['model_bytes'] / 2**20:.0f} MiB), {start['extra_rss_training_over_model']}x above the pre-start RSS")
    print()


def pick_threads(asked: str) -> tuple[int, str]:
    """torch's default, unless other work already holds a core: then fewer threads.

    Two OpenMP threads on two cores next to a busy process slow down 10-100x
    (each parallel region waits for the descheduled thread), which says nothing
    about the trainer; fewer threads keep both sides comparable.
    """
    if asked != "auto":
        return int(asked), "asked"
    default = torch.get_num_threads()
    busy = busy_cores()
    cores = os.cpu_count() or default
    if busy is not None and default > 1 and busy >= 0.5 and cores - busy < default:
        return max(1, int(cores - busy + 0.5)), f"other work holds {busy} of {cores} cores"
    return default, "torch default" + (f"; {busy} of {cores} cores busy" if busy is not None else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and two rounds (under 10 minutes on 2 cores)")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    p.add_argument("--steps", type=int, default=None, help="steps per segment (quick 20, full 40)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped per segment (quick 5, full 8)")
    p.add_argument("--rounds", type=int, default=None, help="trainer segments per algo (quick 2, full 4)")
    p.add_argument("--no-ileco", dest="ileco", action="store_false",
                   help="skip iLECO (two U-Net forwards, the first without grad and network, one backward)")
    p.add_argument("--no-p2", dest="p2", action="store_false",
                   help="skip P2 (trainer steps/s over a peft reference loop that VAE-encodes each step)")
    p.add_argument("--no-startup", dest="startup", action="store_false",
                   help="skip the start-up split and peak-memory run (a child process)")
    p.add_argument("--vae", choices=("scaled", "small", "sd"), default="scaled",
                   help="the model's VAE: scaled (SD1 layout at the U-Net's width, the default), small (cheap caching) or sd (SD1 size)")
    p.add_argument("--model", choices=("bench", "sd15"), default="bench",
                   help="bench: the ~35M-parameter SD1-like U-Net; sd15: SD1.5's real sizes (a check, slow)")
    p.add_argument("--lokr-rebuild", action="store_true",
                   help="bare LoKr builds kron(w1, w2) each forward instead of LyCORIS's grouped bypass")
    p.add_argument("--loha-recompute", action="store_true",
                   help="bare LoHa rebuilds its two products in the backward, as LyCORIS does to save memory, "
                        "instead of autograd keeping them")
    p.add_argument("--threads", default="auto",
                   help="torch threads; auto = torch's default, or fewer when other work holds a core")
    args = p.parse_args(argv)
    quick = {"steps": 20, "warmup": 5, "rounds": 2}
    full = {"steps": 40, "warmup": 8, "rounds": 4}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.algos = [x.strip() for x in args.algos.split(",") if x.strip()]
    unknown = set(args.algos) - set(ALGOS)
    if unknown:
        p.error(f"unknown algos: {', '.join(sorted(unknown))}")
    if args.steps <= args.warmup:
        p.error("--steps must be more than --warmup")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lycoris_logger.setLevel(logging.ERROR)  # its per-layer "full matrix mode" notices drown the table
    threads, why = pick_threads(args.threads)
    torch.set_num_threads(threads)
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")  # CSV logs stay on, outside the repo
        os.environ["TRAINDECK_JSONS"] = str(Path(tmp) / "jsons")
        b = Bench(args, Path(tmp))
        unet_params = n_params(b.bundle.unet)
        layout = "SD1.5" if args.model == "sd15" else "SD1 layout, channels 64-128-256-256"
        print(f"U-Net: {unet_params:,} parameters ({layout}), "
              f"{PIXELS}x{PIXELS} px, batch 1, fp32, AdamW, rank 16 / alpha 8; torch {torch.__version__}, "
              f"{threads} threads ({why}); load {load_before}", flush=True)
        results = {algo: bench_algo(b, algo) for algo in args.algos}
        if args.ileco:
            results["ileco"] = bench_algo(b, "lierla", "iLECO")
        p2 = bench_p2(b, lambda: _medians(b.trainer_segment("lierla", args.steps), args.warmup)[0]) if args.p2 else {}
    # Start-up loads a single-file checkpoint, whose VAE conversion assumes SD's 32 norm groups:
    # the scaled VAE (13 groups) cannot take that path, so start-up uses the small one then.
    start_vae = "small" if args.vae == "scaled" else args.vae
    measure_start = args.startup and args.model == "bench"  # the child process builds the bench model only
    start = {"vae": start_vae, **startup.run(threads=threads, vae=start_vae)} if measure_start else {}
    print_table(results)
    print_extras(p2, start)
    summary = {
        "P1": {k: round(v["ratio"], 4) for k, v in results.items()},
        "ms_per_step": {k: {"trainer": round(v["trainer_ms"], 1), "bare": round(v["bare_ms"], 1)}
                        for k, v in results.items()},
        **p2, "startup": start,
        "P1_cpu": {k: round(v["cpu_ratio"], 4) for k, v in results.items()},
        "cpu_ms_per_step": {k: {"trainer": round(v["trainer_cpu_ms"], 1), "bare": round(v["bare_cpu_ms"], 1)}
                            for k, v in results.items()},
        "ratios_by_round": {k: [round(x, 4) for x in v["ratios"]] for k, v in results.items()},
        "modules": {k: v["modules"] for k, v in results.items()},
        "bare": {"lokr": "kron rebuilt" if args.lokr_rebuild else "grouped bypass",
                 "loha": "products rebuilt in backward" if args.loha_recompute else "products kept by autograd"},
        "model": args.model, "unet_params": unet_params, "vae": args.vae if args.model == "bench" else "sd15", "vae_params": n_params(b.bundle.vae), **environment(), "threads_why": why,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick,
        "load_avg_start": load_before, "load_avg_end": load_average(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
