"""Training on the model a WebUI already holds versus loading the same checkpoint from file.

    python bench/host_reuse.py [--steps N]

Each side runs in its own process, so peak memory is its own. The "host" side holds an
A1111-layout model in memory (the tests' stand-in for the WebUI's `modules`) and
trains through the WebUI host adapter, which builds the bundle from those tensors;
the "file" side trains through the standalone host, which reads the checkpoint (its
pages dropped from the page cache first, so the read is a cold one).
It prints seconds from Start to the first step (split into load + network build,
latent caching, and the first step) and the peak extra memory (RSS high-water mark
minus what the process held just before Start) against the model's size, then one
JSON line with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_now_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed), so reading it hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Clock:
    """Progress listener: when loading ends (first caching event), training starts, step 1 ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def __call__(self, p) -> None:
        now = time.perf_counter() - self.start
        key = {"caching": "cache", "training": "train" if p.step == 0 else ("step1" if p.step == 1 else None)}.get(p.phase)
        if key and key not in self.marks:
            self.marks[key] = now


def child(variant: str, work: Path, steps: int) -> dict:
    """One side, in a process of its own: the host side first holds the model as the WebUI would."""
    import gc

    from bench.common import bench_config, make_images
    from tests.webuikit import a1111_model_from_ldm, fake_webui
    from trainer.families.checkpoint import read_state_dict
    from trainer.training.engine import Trainer
    from trainer.hosts.base import StandaloneHost

    data = make_images(work / "data")
    checkpoint = work / "bench.safetensors"
    model_mb = checkpoint.stat().st_size / 2**20
    with fake_webui("a1111") as w:
        cfg = bench_config("lierla", data, steps, f"reuse-{variant}")
        if variant == "host":
            from trainer.hosts.webui import WebUIHost

            sd, _ = read_state_dict(checkpoint)  # what the WebUI did at its own start
            w.shared.sd_model = a1111_model_from_ldm(sd, "sd1", checkpoint, False)  # in RAM, as a WebUI holds it
            w.shared.cmd_opts.lora_dir = str(work / "lora")
            del sd
            host, cfg = WebUIHost(), cfg.with_overrides({"model": ""})
        else:
            evict(checkpoint)  # a cold read, as after the WebUI started: its own load is long past
            host = StandaloneHost(work / "lora", [work])
            cfg = cfg.with_overrides({"model": checkpoint.name})
        gc.collect()
        before = rss_now_mb()
        clock = Clock()
        result = Trainer(cfg, host, device="cpu", listeners=[clock]).run()
    m = clock.marks
    return {"variant": variant, "status": result.status, "model_mb": round(model_mb, 1),
            "load_and_build_s": round(m["cache"], 3), "cache_s": round(m["train"] - m["cache"], 3),
            "first_step_s": round(m["step1"] - m["train"], 3), "start_to_first_step_s": round(m["step1"], 3),
            "extra_peak_mb": round(peak_mb() - before, 1)}


def write_checkpoint(work: Path) -> None:
    from bench.common import bench_bundle
    from tests.ldm_export import write_single_file

    write_single_file(bench_bundle(), work / "bench.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", choices=("host", "file"))
    p.add_argument("--work")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.steps)))
        return
    env = {**os.environ, "TRAINDECK_LOGS": tempfile.mkdtemp(prefix="reuse-logs-")}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="reuse-") as work:
        write_checkpoint(Path(work))
        for variant in ("host", "file"):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--work", work,
                                  "--steps", str(args.steps)], capture_output=True, text=True, env=env, check=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows.values():
        print(f"{r['variant']:5} load+build {r['load_and_build_s']:6.2f} s  cache {r['cache_s']:5.2f} s  "
              f"first step {r['first_step_s']:5.2f} s  start->step1 {r['start_to_first_step_s']:6.2f} s  "
              f"extra peak {r['extra_peak_mb']:7.1f} MB  (model {r['model_mb']} MB)")
    host, file = rows["host"], rows["file"]
    print(json.dumps({
        "start_to_first_step_ratio_file_over_host": round(file["start_to_first_step_s"] / host["start_to_first_step_s"], 3),
        "extra_peak_over_model": {k: round(r["extra_peak_mb"] / r["model_mb"], 3) for k, r in rows.items()},
        "rows": rows}))


if __name__ == "__main__":
    main()
