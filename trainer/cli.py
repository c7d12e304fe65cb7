"""Headless CLI: python -m trainer --preset FILE [--model PATH] [--lora-dir DIR] [--set k=v ...]

Started by torchrun or accelerate launch (WORLD_SIZE > 1), the job trains data-parallel
across the launched processes (trainer/training/distributed.py); rank 0 alone writes and prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from .config.schema import SECOND_PASS_KEY, TrainConfig
from .config.params import ConfigError, Param

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_STOPPED = 3
SECOND_PASS_PREFIX = f"{SECOND_PASS_KEY}."  # --set "2nd pass.train_iterations=200"


def _describe(name: str, p: Param, default: object) -> str:
    from .families import LABELS  # the families' own names for them

    kind = f"one of {', '.join(p.choices)}" if p.choices else p.kind
    shown = json.dumps(default) if not isinstance(default, str) else repr(default)
    modes = "" if len(p.modes) == 5 else f" [{', '.join(p.modes)}]"
    modes += f" [{', '.join(LABELS.get(f, f) for f in p.families)} only]" if p.families else ""
    return f"  {p.key}\n" + textwrap.fill(f"{p.help} ({kind}; default {shown}){modes}", 78,
                                          initial_indent="      ", subsequent_indent="      ")


def parameter_help() -> str:
    """Every setting, generated from the schema."""
    defaults = TrainConfig()
    lines = ["settings (use with --set KEY=VALUE; KEY is the preset key or the field name;",
             "Difference's second pass takes --set \"2nd pass.KEY=VALUE\"):"]
    for name, p in TrainConfig.params():
        lines.append(_describe(name, p, getattr(defaults, name)))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Train one LoRA/LyCORIS job without a UI.",
        epilog=parameter_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="preset JSON file, or a preset name in presets/")
    parser.add_argument("--model", help="checkpoint file or diffusers folder (overrides the preset's model)")
    parser.add_argument("--vae", help="separate VAE file (overrides the preset's vae)")
    parser.add_argument("--clip-l", dest="clip_l", help="FLUX, SD3: the CLIP-L text encoder file (sets clip_l)")
    parser.add_argument("--clip-g", dest="clip_g", help="SD3: the CLIP-G text encoder file (sets clip_g)")
    parser.add_argument("--t5xxl", help="FLUX, SD3: the T5-XXL text encoder file (sets t5xxl)")
    parser.add_argument("--ae", help="FLUX, SD3: the autoencoder file (sets ae)")
    parser.add_argument("--lora-dir", default="output", help="where the network is written (default: ./output)")
    parser.add_argument("--models-dir", action="append", default=[], help="folder to look up model names in (repeatable)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--device", help="force a torch device, e.g. cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _known(key: str) -> bool:
    key = key[len(SECOND_PASS_PREFIX):].strip() if key.startswith(SECOND_PASS_PREFIX) else key
    try:
        TrainConfig.param_for(key)
    except KeyError:
        return False
    return True


def split_set(item: str) -> tuple[str, str]:
    """KEY and VALUE of one --set item.

    Some preset keys hold '=' themselves (``network_blocks(BASE = TextEncoder)``) and
    values may too (``train_optimizer_settings=weight_decay=0.01``): the split is at the
    last '=' whose left side is a known key. A key may also be quoted: ``"KEY"=VALUE``.
    """
    text = item.strip()
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        rest = text[end + 1:].lstrip() if end > 0 else ""
        if end < 0 or not rest.startswith("="):
            raise ConfigError("--set", item, "expected \"KEY\"=VALUE")
        return text[1:end].strip(), rest[1:]
    cuts = [i for i, c in enumerate(item) if c == "="]
    if not cuts or not item[:cuts[0]].strip():
        raise ConfigError("--set", item, "expected KEY=VALUE")
    for cut in reversed(cuts):
        if _known(item[:cut].strip()):
            return item[:cut].strip(), item[cut + 1:]
    return item[:cuts[0]].strip(), item[cuts[0] + 1:]  # unknown either way: named in the error


def parse_sets(items: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(overrides, second-pass overrides) from KEY=VALUE items; ``2nd pass.KEY=VALUE`` goes to the second."""
    out: dict[str, str] = {}
    second: dict[str, str] = {}
    for item in items:
        key, value = split_set(item)
        target = out
        if key.startswith(SECOND_PASS_PREFIX):
            key, target = key[len(SECOND_PASS_PREFIX):].strip(), second
        if not _known(key):
            raise ConfigError("--set", item, f"unknown setting {key!r}; see --help for the list")
        target[key] = value
    return out, second


def load_config(args: argparse.Namespace, warn: bool = True) -> TrainConfig:
    from .config.presets import load_preset

    warnings: list[str] = []
    cfg = load_preset(args.preset, warnings=warnings)
    for note in warnings if warn else ():
        print(f"warning: {note}", file=sys.stderr)
    overrides, second = parse_sets(args.sets)
    if args.model:
        overrides["model"] = args.model
    for key in ("vae", "clip_l", "clip_g", "t5xxl", "ae"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    cfg = cfg.with_overrides(overrides)
    if second:
        cfg = cfg.with_overrides({SECOND_PASS_KEY: {**cfg.second_pass, **second}})
    return cfg


class _Bar:
    """tqdm progress for the training steps."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.pass_index = enabled, None, 0

    def __call__(self, p) -> None:
        if not self.enabled or p.phase != "training" or not p.total:
            return
        from tqdm import tqdm

        if self.bar is None or p.pass_index != self.pass_index:
            self.close()
            self.bar, self.pass_index = tqdm(total=p.total, desc=f"{p.name} pass {p.pass_index}", unit="step"), p.pass_index
        if p.step > self.bar.n:
            self.bar.update(p.step - self.bar.n)
            if p.loss_ema is not None:
                self.bar.set_postfix(loss=f"{p.loss_ema:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _train(args: argparse.Namespace, ranks, bar: _Bar):
    """Load the settings and run the job, in the launcher's process group when there is one."""
    from .training.distributed import DataParallel
    from .training.engine import Trainer
    from .hosts.base import StandaloneHost

    cfg = load_config(args, warn=ranks is None or ranks.is_main)
    host = StandaloneHost(Path(args.lora_dir), [Path(d) for d in args.models_dir])
    from .jobs.precheck import precheck

    precheck(cfg, host.lora_dir(), host)  # the checks the UI and the API run when a job is added
    parallel = DataParallel.start(ranks, args.device) if ranks is not None else None
    try:
        return Trainer(cfg, host, device=args.device, listeners=[bar], parallel=parallel).run()
    finally:
        if parallel is not None:
            parallel.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .training.distributed import launched_ranks
    from .training.engine import TrainingFailed

    try:
        ranks = launched_ranks()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    main_rank = ranks is None or ranks.is_main
    # The other ranks stay quiet: one progress bar, one set of warnings, one JSON line.
    logging.basicConfig(level=logging.WARNING if main_rank else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    who = "" if main_rank else f"rank {ranks.rank}: "
    bar = _Bar(not args.quiet and main_rank)
    try:
        result = _train(args, ranks, bar)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as exc:
        bar.close()
        print(f"{who}error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingFailed as exc:
        bar.close()
        print(f"{who}error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    bar.close()
    if main_rank:
        if result.message:  # where the file, the grid or the stop left things
            print(result.message, file=sys.stderr)
        print(json.dumps(result.summary()))
    return 0 if result.status == "done" else EXIT_STOPPED
