"""Runs one training program (a script file or a module) inside this process and measures it.

    python bench/peerrun.py --out FILE [--sys-path DIR] [--unet-channels A,B,C,D | --sdxl-unet-channels C]
                            [--peft-targets N,...]
                            (--script FILE | --module NAME) -- ARGS...

bench/peers.py starts it with each program's own Python. It uses the standard library
and torch only (it runs in the peers' environments too) and changes nothing in the
program's code:
- a global optimizer-step hook timestamps every optimizer step (wall clock and the
  process's CPU time, all threads) and, at the first step, counts the trainable
  parameters the optimizer holds;
- at exit it writes those marks, the count and the process's peak RSS to --out (JSON).
Three settings adapt a peer to the benchmark model, both given on the command line:
--unet-channels sets the block widths of kohya's own U-Net class (it hard-codes SD1.5's
320-640-1280-1280; its layout comes from the model's config otherwise), --sdxl-unet-channels
does the same for kohya's SDXL U-Net (its base width, 320, and the time-embedding width
that follows from it; bench/peersxl.py keeps SDXL's depths, context and vector widths), and
--peft-targets widens a LoraConfig built for the attention projections only to the
listed module names, so that every program trains the same modules; --torchvision-stub tells
transformers that torchvision is absent when bench/peerkit.py's transforms-only stand-in is
on the path (torchvision is not installed here).
"""
from __future__ import annotations

import argparse
import atexit
import json
import resource
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ATTENTION_ONLY = {"to_q", "to_k", "to_v", "to_out.0"}  # the diffusers example's LoraConfig targets


class StepMarks:
    """Optimizer-step marks of the first optimizer that steps (a wrapper stepping it is not counted twice)."""

    def __init__(self, profile: tuple[int, int] | None = None) -> None:
        self.profile = profile  # (first, last): torch.profiler runs from the end of step first to that of last
        self.prof = None
        self.ops: dict[str, list[float]] = {}
        self.opt_id: int | None = None
        self.marks: list[tuple[float, float, float]] = []  # (epoch, perf_counter, process_time)
        self.trainable: int | None = None
        self.optimizer = ""

    def __call__(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        if self.opt_id is None:
            self.opt_id = id(opt)
            seen: dict[int, torch.Tensor] = {}
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        seen[id(p)] = p
            self.trainable = sum(p.numel() for p in seen.values())
            self.optimizer = type(opt).__name__
        if id(opt) == self.opt_id:
            self.marks.append((time.time(), time.perf_counter(), time.process_time()))
            self._window(len(self.marks))

    def _window(self, step: int) -> None:
        if self.profile is None:
            return
        first, last = self.profile
        if step == first:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.prof.start()
        elif step == last and self.prof is not None:
            self.prof.stop()
            n = last - first
            # {op: [calls per step, self CPU ms per step]}
            self.ops = {e.key: [e.count / n, e.self_cpu_time_total / 1000.0 / n]
                        for e in self.prof.key_averages() if e.self_cpu_time_total > 0}
            self.prof = None


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (getrusage's maxrss would carry the parent's peak over exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: the rusage figure below
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def patch_kohya_unet(channels: list[int]) -> None:
    """kohya's original U-Net reads its block widths from module constants; set them to the model's."""
    from library import original_unet as ou

    ou.BLOCK_OUT_CHANNELS = tuple(channels)
    ou.TIMESTEP_INPUT_DIM = channels[0]
    ou.TIME_EMBED_DIM = channels[0] * 4


def patch_kohya_sdxl_unet(channels: int) -> None:
    """kohya's SDXL U-Net builds its levels from MODEL_CHANNELS (x1, x2, x4) and TIME_EMBED_DIM."""
    from library import sdxl_original_unet as su

    su.MODEL_CHANNELS = channels
    su.TIME_EMBED_DIM = channels * 4


def hide_stub_from_transformers() -> None:
    """transformers (5.x) takes any importable torchvision for the real one and imports its video
    and image modules; the bench stand-in has transforms only, so tell it torchvision is absent."""
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except ImportError:
        return  # no transformers: nothing to tell
    for mod in (tu, iu):
        for name in ("is_torchvision_available", "is_torchvision_v2_available"):
            if hasattr(mod, name):
                setattr(mod, name, lambda: False)


def widen_peft(targets: list[str]) -> None:
    """A LoraConfig made for exactly the attention projections gets `targets` instead."""
    import peft

    original = peft.LoraConfig.__post_init__

    def post_init(self) -> None:
        if self.target_modules is not None and set(self.target_modules) == ATTENTION_ONLY:
            self.target_modules = list(targets)
        original(self)

    peft.LoraConfig.__post_init__ = post_init


def main() -> None:
    p = argparse.ArgumentParser(description="run a training program and time its optimizer steps")
    p.add_argument("--out", required=True)
    p.add_argument("--sys-path", action="append", default=[])
    p.add_argument("--unet-channels")
    p.add_argument("--sdxl-unet-channels", type=int)
    p.add_argument("--peft-targets")
    p.add_argument("--profile", help="FIRST,LAST: profile the optimizer steps after FIRST up to LAST")
    p.add_argument("--torchvision-stub", action="store_true", help="a transforms-only stand-in is on the path")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--script")
    what.add_argument("--module")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.path[:0] = args.sys_path
    window = tuple(int(x) for x in args.profile.split(",")) if args.profile else None
    marks = StepMarks(window)
    register_optimizer_step_post_hook(marks)

    def dump() -> None:
        peak = peak_rss_bytes()
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"marks": marks.marks, "trainable": marks.trainable, "optimizer": marks.optimizer,
                       "peak_rss_bytes": peak, "threads": torch.get_num_threads(),
                       "ops": marks.ops}, fh)

    atexit.register(dump)
    if args.torchvision_stub:
        hide_stub_from_transformers()
    if args.unet_channels:
        patch_kohya_unet([int(c) for c in args.unet_channels.split(",")])
    if args.sdxl_unet_channels:
        patch_kohya_sdxl_unet(args.sdxl_unet_channels)
    if args.peft_targets:
        widen_peft(args.peft_targets.split(","))
    if args.script:
        sys.argv = [args.script, *rest]
        runpy.run_path(args.script, run_name="__main__")
    else:
        sys.argv = [args.module, *rest]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
