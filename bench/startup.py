"""Start-up split and memory of one training run, in a fresh process of its own.

    python bench/startup.py [--steps N] [--images N]

The child trains the benchmark model from a single-file checkpoint through the
standalone host. A Progress listener with timestamps splits Start -> first step
into load (the checkpoint read into a bundle), build (network and optimizer),
cache (latents and captions; per image too) and the first step. A thread samples
the process's RSS every 10 ms and keeps the peak of each phase; the peak during
training is set against the model's size (bytes of the U-Net, text encoder and
VAE parameters). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the high-water mark, in KiB on Linux/BSD)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseClock:
    """Progress listener: when each start-up mark happens, and the peak RSS while each phase runs."""

    def __init__(self, interval: float = 0.01) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.steps: dict[int, float] = {}  # step -> when it ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            now, phase = rss_bytes(), self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), now)
            self._stop.wait(interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, key: str) -> None:
        self.marks.setdefault(key, time.perf_counter() - self.start)

    def __call__(self, p) -> None:
        if p.phase == "loading":
            # the second "loading" event comes once the host handed the bundle over
            self.mark("loaded" if "started" in self.marks else "started")
            self.phase = "build" if "loaded" in self.marks else "load"
        elif p.phase == "caching":
            self.mark("cache")
            self.phase = "cache"
        elif p.phase == "training":
            self.mark({0: "train", 1: "step1"}.get(p.step, "later"))
            self.steps.setdefault(p.step, time.perf_counter() - self.start)
            self.phase = "training"
        else:
            self.phase = p.phase


def split(marks: dict[str, float], images: int) -> dict:
    """Seconds of each start-up part from the marks."""
    cache_s = marks["train"] - marks.get("cache", marks["train"])
    return {"load_s": round(marks["loaded"] - marks["started"], 3),
            "build_s": round(marks.get("cache", marks["train"]) - marks["loaded"], 3),
            "cache_s": round(cache_s, 3), "cache_per_image_s": round(cache_s / images, 4),
            "first_step_s": round(marks["step1"] - marks["train"], 3),
            "start_to_first_step_s": round(marks["step1"] - marks["started"], 3)}


def child(work: Path, steps: int, images: int) -> dict:
    """Train from the checkpoint in `work`; the start-up split and memory figures."""
    import gc

    import torch

    from bench.common import bench_config, make_images
    from trainer.training.engine import Trainer
    from trainer.hosts.base import StandaloneHost

    data = make_images(work / "data", n=images)
    host = StandaloneHost(work / "lora", [work])
    cfg = bench_config("lierla", data, steps, "startup").with_overrides({"model": "bench.safetensors"})
    gc.collect()
    before = rss_bytes()
    clock = PhaseClock()
    result = Trainer(cfg, host, device=torch.device("cpu"), listeners=[clock]).run()
    clock.close()
    if result.status != "done":
        raise RuntimeError(f"start-up run ended {result.status}: {result.message}")
    bundle = host.load_bundle(cfg, dtype=torch.float32, device=torch.device("cpu"))  # the host's cached one
    model = sum(p.numel() * p.element_size() for m in bundle.modules() for p in m.parameters())
    train_peak = clock.peaks.get("training", 0)
    ends = [clock.steps[k] for k in sorted(clock.steps)]
    return {**split(clock.marks, images), "images": images, "model_bytes": model,
            "step_s": [round(b - a, 3) for a, b in pairwise(ends)],
            "rss_before_start_bytes": before, "peak_rss_training_bytes": train_peak,
            "peak_rss_by_phase_bytes": clock.peaks,
            "peak_rss_training_over_model": round(train_peak / model, 3),
            "extra_rss_training_over_model": round((train_peak - before) / model, 3)}


def run(steps: int = 3, images: int = 4, threads: int | None = None, vae: str = "small") -> dict:
    """The child in a fresh process (its memory is its own) on a freshly written checkpoint."""
    from bench.common import bench_bundle
    from tests.ldm_export import write_single_file

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        write_single_file(bench_bundle(vae=vae), Path(work) / "bench.safetensors")
        env = {**os.environ, "TRAINDECK_LOGS": str(Path(work) / "logs"), "TRAINDECK_JSONS": str(Path(work) / "jsons")}
        if threads:  # the same torch thread count as the caller's measurements
            env["OMP_NUM_THREADS"] = str(threads)
        out = subprocess.run([sys.executable, __file__, "--child", work, "--steps", str(steps),
                              "--images", str(images)], capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"start-up child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--vae", choices=("small", "sd"), default="small")  # a single file needs 32 norm groups
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.steps, args.images)))
        return
    from bench.step import pick_threads

    print(json.dumps(run(args.steps, args.images, pick_threads("auto")[0], args.vae)))


if __name__ == "__main__":
    main()
