"""Drive a running AUTOMATIC1111 or Forge (with Traindeck installed) over HTTP and record what it does.

    python bench/host_drive.py memory --url URL --pid PID --webui DIR [--jobs 5] [--iters 4] --out FILE
    python bench/host_drive.py checks --url URL --webui DIR --log CONSOLE_LOG [--iters 4] --out FILE
    python bench/host_drive.py emphasis --url URL --webui DIR [--loras NAME ...] [--multipliers 1 20] --out FILE

Start the WebUI first (CPU is fine) with its API on (`--api`), a checkpoint selected, and this
extension in extensions/. Standard library plus Pillow (both WebUIs ship it); run it with any Python.

memory: one 64x64 txt2img (a WebUI holds no model before its first generation), then `--jobs` LoRA
        jobs in a row on the loaded model; the WebUI's resident memory (VmRSS of PID) is read before
        the first job and after each, and each must stay within 10% of the first reading.
checks: for lierla, c3lier, loha, lokr, dora and iLECO: a job on the loaded model and the same job
        (same seed) on a hard link of the checkpoint, which the WebUI reads from file; their first
        losses (from the jobs' CSV logs) must be equal. Each file is then generated with through the
        WebUI's own LoRA loader (its console lines recorded: no skipped or unmatched key) and must
        change the image; the image without LoRA must come back. Last, a job right after a
        `<lora:NAME:1>` generation must start from the same loss as the clean job.
emphasis: the same generation under the WebUI's "Original" emphasis and under "No norm" (see the
        README: on a random model the former divides 0 by 0).
The figures go to --out as JSON (bench/results/ keeps the recorded ones).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = "a red circle, simple shapes"
TYPES = ("lierla", "c3lier", "loha", "lokr", "dora", "ileco")


def call(url: str, method: str, path: str, body: dict | None = None, timeout: float = 3600) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:2000]
    return r.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(errors="replace"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def make_data(folder: Path, n: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    for i in range(n):
        im = Image.new("RGB", (64, 64), tuple(rnd.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        x, y = rnd.randrange(40), rnd.randrange(40)
        d.ellipse([x, y, x + 24, y + 24], fill=(220, 30, 30))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPT)
    return folder


def txt2img(url: str, prompt: str, seed: int = 1234) -> dict:
    """One 64x64 2-step image; returns its pixel hash, NaN/black facts and the pixels themselves."""
    from PIL import Image

    body = {"prompt": prompt, "negative_prompt": "", "seed": seed, "width": 64, "height": 64, "steps": 2,
            "cfg_scale": 7, "sampler_name": "Euler", "batch_size": 1}
    t = time.time()
    code, res = call(url, "POST", "/sdapi/v1/txt2img", body)
    if code != 200:
        return {"prompt": prompt, "status": code, "error": str(res)[:500]}
    px = Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB").tobytes()
    return {"prompt": prompt, "status": code, "seconds": round(time.time() - t, 1),
            "pixels_sha256": hashlib.sha256(px).hexdigest()[:16], "max_pixel": max(px), "_px": px}


def mean_abs_diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


def job_settings(kind: str, name: str, data: Path, iters: int, model: str = "") -> tuple[str, dict]:
    over = {"save_lora_name": name, "model": model, "image_size(height, width)": "64", "image_min_length": 64,
            "image_buckets_step": 64, "train_iterations": iters, "train_batch_size": 1, "network_rank": 4,
            "network_alpha": 4, "train_learning_rate": 0.001, "train_seed": 1, "logging_save_csv": True,
            "save_overwrite": True}
    if kind == "ileco":
        over.update({"original prompt": PROMPT, "target prompt": "", "network_type": "lierla"})
        return "iLECO", over
    over.update(network_type="lierla" if kind == "dora" else kind, lora_data_directory=str(data))
    if kind == "dora":
        over["network_dora"] = True
    if kind in ("c3lier", "loha", "lokr"):
        over.update(network_conv_rank=4, network_conv_alpha=4)
    return "LoRA", over


def run_job(url: str, preset: str, over: dict) -> dict:
    """Queue and start one job, wait for it to end; its final row."""
    t = time.time()
    code, job = call(url, "POST", "/traindeck/v1/jobs", {"preset": preset, "overrides": over, "start": True})
    if code not in (200, 201):
        return {"enqueue_status": code, "error": job}
    while True:
        time.sleep(1)
        _, row = call(url, "GET", f"/traindeck/v1/jobs/{job['id']}")
        if isinstance(row, dict) and row.get("state") not in ("queued", "running"):
            row.pop("settings", None)
            row["wall_s"] = round(time.time() - t, 1)
            return row
        if time.time() - t > 3000:
            return {"error": "timeout", "row": row}


def csv_losses(webui: Path, name: str) -> list[float]:
    """Raw losses of the newest CSV log of job `name` (the extension writes logs/YYYYMMDD/NAME-*.csv)."""
    logs = sorted((webui / "extensions").glob(f"*/logs/*/{name}-*.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    rows = logs[-1].read_text().splitlines()
    start = next(i for i, r in enumerate(rows) if r.startswith("Step,"))
    col = rows[start].split(",").index("Raw Loss")
    return [float(r.split(",")[col]) for r in rows[start + 1:] if r]


def memory(a: argparse.Namespace) -> dict:
    data = make_data(Path(a.work) / "data")
    first = txt2img(a.url, PROMPT)
    first.pop("_px", None)
    base = rss_mb(a.pid)
    out = {"first_txt2img": first, "rss_mb_before_first_job": round(base, 1), "jobs": []}
    for i in range(1, a.jobs + 1):
        preset, over = job_settings("lierla", f"mem_{i}", data, a.iters)
        row = run_job(a.url, preset, over)
        now = rss_mb(a.pid)
        out["jobs"].append({"job": i, "state": row.get("state"), "message": row.get("message"),
                            "wall_s": row.get("wall_s"), "rss_mb": round(now, 1),
                            "vs_before": round(now / base - 1, 4)})
        print(json.dumps(out["jobs"][-1]), flush=True)
    out["within_10_percent"] = all(abs(j["vs_before"]) <= 0.10 for j in out["jobs"])
    return out


def console_since(log: Path, pos: int) -> list[str]:
    with open(log, "rb") as fh:
        fh.seek(pos)
        text = fh.read().decode("utf-8", "replace")
    keys = ("[lora]", "lora", "traindeck", "mismatch", "unmatched", "error", "nan", "invalid value")
    return [ln for ln in text.splitlines() if any(k in ln.lower() for k in keys)][:20]


def checks(a: argparse.Namespace) -> dict:
    webui, log = Path(a.webui), Path(a.log)
    data = make_data(Path(a.work) / "data")
    if a.set_emphasis:  # a random model can make "Original" divide 0 by 0 (see `emphasis`)
        call(a.url, "POST", "/sdapi/v1/options", {"emphasis": a.set_emphasis})
    base = txt2img(a.url, PROMPT)
    if "_px" not in base:
        raise RuntimeError(f"the WebUI could not generate without a LoRA: {base}")
    ckpt = Path(a.checkpoint)
    copy = ckpt.with_name(ckpt.stem + "-fromfile" + ckpt.suffix)
    for src, dst in ((ckpt, copy), (ckpt.with_suffix(".yaml"), copy.with_suffix(".yaml"))):
        if src.exists() and not dst.exists():
            os.link(src, dst)  # the same bytes (and config) under another name: the WebUI reads it from file
    call(a.url, "POST", "/sdapi/v1/refresh-checkpoints")
    out: dict = {"emphasis": a.set_emphasis or "as set", "base": {k: v for k, v in base.items() if k != "_px"},
                 "types": {}}
    for kind in a.types:
        r: dict = {}
        for side, model in (("memory", ""), ("file", copy.name)):
            name = f"hc_{kind}" + ("" if side == "memory" else "_file")
            pos = log.stat().st_size
            row = run_job(a.url, *job_settings(kind, name, data, a.iters, model))
            r[side] = {"state": row.get("state"), "message": row.get("message"), "wall_s": row.get("wall_s"),
                       "first_losses": csv_losses(webui, name)[:3], "console": console_since(log, pos)}
        r["same_first_loss"] = bool(r["memory"]["first_losses"]) and \
            r["memory"]["first_losses"][:1] == r["file"]["first_losses"][:1]
        call(a.url, "POST", "/sdapi/v1/refresh-loras")
        pos = log.stat().st_size
        img = txt2img(a.url, f"{PROMPT} <lora:hc_{kind}:1>")
        r["with_lora"] = {k: v for k, v in img.items() if k != "_px"}
        r["with_lora"]["diff_vs_base"] = round(mean_abs_diff(img.get("_px", b""), base["_px"]), 3)
        r["with_lora"]["console"] = console_since(log, pos)
        again = txt2img(a.url, PROMPT)
        r["no_lora_again_equals_base"] = again.get("pixels_sha256") == base["pixels_sha256"]
        out["types"][kind] = r
        print(json.dumps({kind: r}), flush=True)
    if "lierla" in a.types:  # a job right after a generation that merged a LoRA
        txt2img(a.url, f"{PROMPT} <lora:hc_c3lier:1>" if "c3lier" in a.types else f"{PROMPT} <lora:hc_lierla:1>")
        pos = log.stat().st_size
        row = run_job(a.url, *job_settings("lierla", "hc_after_lora", data, a.iters))
        first = csv_losses(webui, "hc_after_lora")[:3]
        out["after_lora_generation"] = {"state": row.get("state"), "message": row.get("message"),
                                        "first_losses": first, "console": console_since(log, pos),
                                        "same_as_clean": first[:1] == out["types"]["lierla"]["memory"]["first_losses"][:1]}
        print(json.dumps(out["after_lora_generation"]), flush=True)
    return out


def emphasis(a: argparse.Namespace) -> dict:
    """Each prompt (with no LoRA, then each of --loras at each of --multipliers) under the WebUI's
    "Original" emphasis, which divides the conditioning by its mean, and under "No norm", which does not."""
    out: dict = {"runs": []}
    prompts = [PROMPT] + [f"{PROMPT} <lora:{n}:{m}>" for n in a.loras for m in a.multipliers]
    for mode in ("Original", "No norm"):
        call(a.url, "POST", "/sdapi/v1/options", {"emphasis": mode})
        for prompt in prompts:
            r = txt2img(a.url, prompt)
            r.pop("_px", None)
            out["runs"].append({"emphasis": mode, **r})
            print(json.dumps(out["runs"][-1]), flush=True)
    call(a.url, "POST", "/sdapi/v1/options", {"emphasis": "Original"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["memory", "checks", "emphasis"])
    ap.add_argument("--loras", nargs="*", default=[], help="LoRA names for emphasis")
    ap.add_argument("--multipliers", nargs="*", type=float, default=[1.0])
    ap.add_argument("--set-emphasis", help="checks: the WebUI's emphasis option to set first (e.g. 'No norm')")
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--pid", type=int, help="the WebUI's process id (memory)")
    ap.add_argument("--webui", required=True, help="the WebUI's folder (CSV logs live in its extensions/)")
    ap.add_argument("--log", help="the WebUI's console log file (checks)")
    ap.add_argument("--checkpoint", help="the loaded checkpoint's file (checks link it to read it from file)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--work", default="/tmp/traindeck-host-drive")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.what == "memory" and not a.pid:
        ap.error("memory needs --pid")
    if a.what == "checks" and not (a.log and a.checkpoint):
        ap.error("checks needs --log and --checkpoint")
    result = {"what": a.what, "url": a.url, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              **{"memory": memory, "checks": checks, "emphasis": emphasis}[a.what](a)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
