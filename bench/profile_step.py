"""Where the trainer's steady-state step time goes, next to the bare loop's.

    python bench/profile_step.py [--algo lierla] [--steps 14] [--warmup 6] [--top 25] [--python]

torch.profiler runs over the same steady steps of both sides (started and stopped
from a Progress listener on the trainer side, so set-up and saving are outside).
It prints each side's top ops by self CPU time, then the ops whose per-step
count or time differ most: what the engine (or LyCORIS) runs that the bare
math does not. --python adds a cProfile of the trainer's steady steps
(Python-level costs: events, CSV, LyCORIS dispatch), sorted by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import bare  # noqa: E402
from bench.common import ALGOS, SEED, BenchHost  # noqa: E402
from bench.step import Bench  # noqa: E402
from trainer.training.engine import Trainer  # noqa: E402


class Window:
    """Starts a profiler when step `first` ends and stops it when step `last` ends."""

    def __init__(self, first: int, last: int, python: bool = False):
        self.first, self.last = first, last
        self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self.py = cProfile.Profile() if python else None

    def __call__(self, p) -> None:
        if p.phase != "training":
            return
        if p.step == self.first:
            self.prof.start()
            if self.py:
                self.py.enable()
        elif p.step == self.last:
            if self.py:
                self.py.disable()
            self.prof.stop()
            self.first = self.last = -1  # once


def op_table(prof, steps: int) -> dict[str, tuple[int, float]]:
    """{op: (calls per step, self CPU ms per step)}."""
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.count / steps, e.self_cpu_time_total / 1000.0 / steps)
    return out


def print_top(title: str, table: dict[str, tuple[float, float]], top: int) -> None:
    total = sum(ms for _, ms in table.values())
    print(f"\n== {title}: {total:.1f} ms/step of self CPU time in ops ==")
    print(f"{'op':48} {'calls/step':>10} {'ms/step':>9}")
    for name, (calls, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name[:48]:48} {calls:10.1f} {ms:9.2f}")


def print_diff(trainer: dict, bare_t: dict, top: int) -> None:
    print("\n== trainer minus bare, per step (largest time differences first) ==")
    print(f"{'op':48} {'calls T':>8} {'calls B':>8} {'ms T':>8} {'ms B':>8} {'ms T-B':>8}")
    rows = []
    for name in set(trainer) | set(bare_t):
        ct, mt = trainer.get(name, (0.0, 0.0))
        cb, mb = bare_t.get(name, (0.0, 0.0))
        rows.append((mt - mb, name, ct, cb, mt, mb))
    rows.sort(key=lambda r: -abs(r[0]))
    for d, name, ct, cb, mt, mb in rows[:top]:
        print(f"{name[:48]:48} {ct:8.1f} {cb:8.1f} {mt:8.2f} {mb:8.2f} {d:8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", default="lierla", choices=ALGOS)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--python", action="store_true", help="also cProfile the trainer's steady steps")
    p.add_argument("--lokr-rebuild", action="store_true")
    p.add_argument("--loha-recompute", action="store_true")
    args = p.parse_args()
    lycoris_logger.setLevel(logging.ERROR)
    active = args.steps - args.warmup
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        os.environ["TRAINDECK_LOGS"] = str(Path(tmp) / "logs")
        b = Bench(argparse.Namespace(lokr_rebuild=args.lokr_rebuild, loha_recompute=args.loha_recompute), Path(tmp))
        unet, deltas, *_ = b.bare_model(args.algo)
        window = Window(args.warmup, args.steps, python=args.python)
        Trainer(b.cfg(args.algo, args.steps), BenchHost(b.bundle, b.lora_dir), device=torch.device("cpu"),
                listeners=[window]).run()
        trainer_ops = op_table(window.prof, active)
        b.bare_segment(unet, deltas, args.warmup, SEED)
        with profile(activities=[ProfilerActivity.CPU]) as bprof:
            bare.bare_loop(unet, deltas, steps=active, latents=b.latents, cond=b.cond,
                           alphas_cumprod=b.bundle.noise_scheduler.alphas_cumprod, snr_gamma=5.0,
                           lr=1e-4, seed=SEED + 1)
        bare_ops = op_table(bprof, active)
    print_top(f"trainer ({args.algo})", trainer_ops, args.top)
    print_top(f"bare ({args.algo})", bare_ops, args.top)
    print_diff(trainer_ops, bare_ops, args.top)
    if window.py is not None:
        out = io.StringIO()
        stats = pstats.Stats(window.py, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        # the engine's own functions, by total time including callees
        stats.sort_stats("cumulative").print_stats(r"trainer[/\\]", args.top)
        print(f"\n== cProfile of the trainer's {active} steady steps (own time; then trainer/ by cumulative) ==")
        print(out.getvalue())


if __name__ == "__main__":
    main()
