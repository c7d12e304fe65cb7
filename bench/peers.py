"""The project's CLI against the trainers users would pick instead, side by side on the same work.

    python bench/peers.py --kohya DIR --kohya-python PY --diffusers DIR --diffusers-python PY
                          [--family sd1|sdxl] [--steps 24 --warmup 4 --rounds 2 --threads 2 --images 16]

DIR is a checkout of kohya-ss/sd-scripts (train_network.py) and one of huggingface/diffusers
(examples/text_to_image/train_text_to_image_lora.py), each with the Python of an environment
where that program runs (TRAINDECK_KOHYA, TRAINDECK_KOHYA_PYTHON, TRAINDECK_DIFFUSERS and
TRAINDECK_DIFFUSERS_PYTHON work too). Nothing is downloaded and no peer code lives here.
A program left out (no checkout given) is not run. The project runs with this Python.

One model and one data set are generated (bench/peerkit.py). Every program trains LoRA rank
16 on the same 192 transformer-block layers of the U-Net (text encoder frozen), AdamW at 1e-4
with a constant schedule, fp32, batch 1, on `--threads` threads, caching latents where it
can; rounds are interleaved (each round runs every program once, in a rotated order). Each
program runs under bench/peerrun.py, which times its optimizer steps and counts the
parameters its optimizer trains inside its process; a ratio is refused when the counts
differ. The last line printed is one JSON object.

`--family sdxl` does the same on an SDXL-layout model (bench/peersxl.py) at 128 px against
kohya's sdxl_train_network.py (text-encoder outputs cached too) and the diffusers example
examples/text_to_image/train_text_to_image_lora_sdxl.py, on the 722 transformer-block layers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import LEARNING_RATE, PIXELS, RANK, SEED, bench_config, load_average  # noqa: E402
from bench.peerkit import (UNET_CHANNELS, write_data, write_model, write_tokenizer_cache,  # noqa: E402
                           write_torchvision_stub)
from bench.peerstats import op_diff, summarize  # noqa: E402
from bench.peersxl import (XL_PIXELS, diffusers_sdxl_cmd, kohya_sdxl_cmd, write_sdxl_model,  # noqa: E402
                           write_sdxl_tokenizer_cache)

RUNNER = Path(__file__).resolve().parent / "peerrun.py"
EXAMPLE = Path("examples/text_to_image/train_text_to_image_lora.py")
# The 192 layers the project's lierla trains on SD1's transformer blocks, as peft module names.
PEFT_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2"


def project_cmd(work: Path, model: Path, data: Path, steps: int, pixels: int = PIXELS) -> list[str]:
    cfg = bench_config("lierla", data, steps, "peers").with_overrides(
        {"train_lr_scheduler": "constant", "train_lr_warmup_steps": 0, "save_overwrite": True,
         "image_size": [pixels, pixels], "image_min_length": pixels})
    preset = work / "project-preset.json"
    preset.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return [sys.executable, str(RUNNER), "--out", "{out}", "--sys-path", str(ROOT), "--module", "trainer", "--",
            "--preset", str(preset), "--model", str(model), "--lora-dir", str(work / "out-project"),
            "--device", "cpu", "--quiet"]


def kohya_cmd(py: str, checkout: Path, work: Path, model: Path, data: Path, steps: int) -> list[str]:
    return [py, str(RUNNER), "--out", "{out}", "--sys-path", str(checkout), "--torchvision-stub",
            "--unet-channels", ",".join(map(str, UNET_CHANNELS)), "--script", str(checkout / "train_network.py"), "--",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", f"{PIXELS},{PIXELS}", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--network_module", "networks.lora", "--network_dim", str(RANK),
            "--network_alpha", "8", "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--mixed_precision", "no",
            "--save_precision", "float", "--cache_latents", "--sdpa", "--seed", str(SEED),
            "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir", str(work / "tokenizers"),
            "--output_dir", str(work / "out-kohya"), "--output_name", "peers"]


def diffusers_cmd(py: str, checkout: Path, work: Path, model: Path, data: Path, steps: int) -> list[str]:
    return [py, str(RUNNER), "--out", "{out}", "--torchvision-stub", "--peft-targets", PEFT_TARGETS,
            "--script", str(checkout / EXAMPLE), "--",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_column", "text", "--resolution", str(PIXELS), "--center_crop", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--rank", str(RANK), "--mixed_precision", "no", "--seed", str(SEED),
            "--dataloader_num_workers", "0", "--output_dir", str(work / "out-diffusers")]


def run_one(name: str, cmd: list[str], env: dict, work: Path, tag: str) -> dict:
    """One program in a fresh process; its marks and memory, and the time from spawn to its first step."""
    out = work / f"{tag}.json"
    cmd = [str(out) if c == "{out}" else c for c in cmd]
    load = load_average()
    spawned = time.time()
    proc = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, check=False)
    (work / f"{tag}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not out.is_file():
        log = work / f"{tag}.log"
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text(encoding="utf-8"))
    data.update(spawned=spawned, load_before=load, load_after=load_average())
    return data


def base_env(threads: int, wait_policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_WAIT_POLICY")}
    if wait_policy:  # the same for every program
        env["OMP_WAIT_POLICY"] = wait_policy
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DIFFUSERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def parse_args() -> argparse.Namespace:
    e = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kohya", default=e("TRAINDECK_KOHYA"), help="sd-scripts checkout")
    p.add_argument("--kohya-python", default=e("TRAINDECK_KOHYA_PYTHON"))
    p.add_argument("--diffusers", default=e("TRAINDECK_DIFFUSERS"), help="diffusers checkout (for its example)")
    p.add_argument("--diffusers-python", default=e("TRAINDECK_DIFFUSERS_PYTHON"))
    p.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                   help="the model's layout; sdxl runs kohya's sdxl_train_network.py and the SDXL example")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4, help="optimizer steps left out of the rates")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"),
                   help="set for every program (default: unset, PyTorch's own); PASSIVE keeps CPU seconds honest "
                        "on a machine shared with other work, where spinning threads wait for descheduled ones")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the rounds, run each program once more with torch.profiler over N steady steps")
    p.add_argument("--work", help="keep the model, data and logs here (default: a temporary folder)")
    args = p.parse_args()
    for name in ("kohya", "diffusers"):
        checkout, py = getattr(args, name), getattr(args, f"{name}_python")
        if checkout and not py:
            p.error(f"--{name} needs --{name}-python (the Python of an environment where it runs)")
        if checkout and not Path(checkout).is_dir():
            p.error(f"--{name}: {checkout} is not a folder")
    if args.rounds < 2 and not (args.rounds == 0 and args.profile):
        p.error(f"--rounds must be 2 or more (interleaved rounds), or 0 with --profile, not {args.rounds}")
    if args.steps <= args.warmup + 1:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) by 2 or more")
    return args


def sd1_programs(args: argparse.Namespace, work: Path, env: dict) -> tuple[dict, dict, int]:
    """{program: (command, environment)}, the model's sizes and the image size, for the SD1-layout work."""
    model = work / "model"
    sizes = write_model(model)
    data = write_data(work / "data", args.images)
    programs = {"project": (project_cmd(work, model, data["project"], args.steps), env)}
    if args.kohya:
        write_tokenizer_cache(model, work / "tokenizers")
        programs["kohya"] = (kohya_cmd(args.kohya_python, Path(args.kohya), work, model, data["kohya"],
                                       args.steps), peer_env(env, work))
    if args.diffusers:
        programs["diffusers"] = (diffusers_cmd(args.diffusers_python, Path(args.diffusers), work, model,
                                               data["diffusers"], args.steps), peer_env(env, work))
    return programs, sizes, PIXELS


def sdxl_programs(args: argparse.Namespace, work: Path, env: dict) -> tuple[dict, dict, int]:
    """The same for the SDXL-layout work (bench/peersxl.py); its files go under work/sdxl."""
    root = work / "sdxl"
    model = root / "model"
    sizes = write_sdxl_model(model)
    data = write_data(root / "data", args.images, XL_PIXELS)
    programs = {"project": (project_cmd(root, model, data["project"], args.steps, XL_PIXELS), env)}
    if args.kohya:
        write_sdxl_tokenizer_cache(model, root / "tokenizers")
        programs["kohya"] = (kohya_sdxl_cmd(args.kohya_python, RUNNER, Path(args.kohya), root, model,
                                            data["kohya"], args.steps), peer_env(env, work))
    if args.diffusers:
        programs["diffusers"] = (diffusers_sdxl_cmd(args.diffusers_python, RUNNER, Path(args.diffusers), root,
                                                    model, data["diffusers"], args.steps, PEFT_TARGETS),
                                 peer_env(env, work))
    return programs, sizes, XL_PIXELS


def peer_env(env: dict, work: Path) -> dict:
    """A peer's environment: the torchvision stand-in on its path."""
    return {**env, "PYTHONPATH": str(write_torchvision_stub(work / "stub"))}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = base_env(args.threads, args.omp_wait_policy)
        build = sdxl_programs if args.family == "sdxl" else sd1_programs
        programs, sizes, pixels = build(args, work, env)
        names = list(programs)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                cmd, penv = programs[name]
                runs[name].append(run_one(name, cmd, penv, work, f"{name}-r{r + 1}"))
                print(f"round {r + 1} {name}: done", file=sys.stderr, flush=True)
        result = summarize(runs, args.warmup) if args.rounds else {}
        if args.profile:
            window = ["--profile", f"{args.warmup},{min(args.steps, args.warmup + args.profile)}"]
            ops = {name: run_one(name, cmd[:2] + window + cmd[2:], penv, work, f"{name}-profile")["ops"]
                   for name, (cmd, penv) in programs.items()}
            result["profile_ms_per_step"] = op_diff(ops)
        result.update(family=args.family, model=sizes, images=args.images, pixels=pixels, steps=args.steps,
                      warmup=args.warmup, rounds=args.rounds, threads=args.threads, omp_wait_policy=args.omp_wait_policy,
                      torchvision_stub=len(names) > 1, cpu_count=os.cpu_count(), load_average_end=load_average())
        print(json.dumps(result))


if __name__ == "__main__":
    main()
