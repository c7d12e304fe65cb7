"""Drive the Traindeck tab of a running AUTOMATIC1111 or Forge in a browser and record what it shows.

    python bench/host_tab.py --url URL --webui DIR --log CONSOLE_LOG --out FILE.json [--shot FILE.png]
                             [--iters 10] [--name NAME] [--lora-dir DIR] [--keep-model]

Start the WebUI first (CPU is fine) with its API on (`--api`, used for the first txt2img only), a
checkpoint selected, and this extension in extensions/. Needs Playwright and Debian's chromium (the
test venvs have Playwright); run it with a Python that has them, never the WebUI's own.

One 64x64 txt2img through the API (a WebUI holds no model before its first generation), then in the
browser: the Traindeck tab, LoRA mode, the model the WebUI has loaded picked in the Model list (with
--keep-model the list is left as the tab opens it: empty, which means the loaded model), a folder of
generated images, `--iters` iterations at 64 px, a unique output name, Start Training.
It waits for the job to end and records every status line the tab showed, the final message, the
console lines the job wrote, and whether the LoRA file exists in the WebUI's Lora folder. It passes
when the job is done, the message names the loaded model and says "reused from memory, no file
read", and the file was written by this job. The figures go to --out as JSON; --shot saves the tab
(a small PNG).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python bench/host_tab.py`
from bench.host_drive import PROMPT, call, console_since, make_data, txt2img

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
REUSED = "reused from memory, no file read"


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def open_tab(page, url: str) -> None:
    """The WebUI's page, then its Traindeck tab (the WebUI's own tab row lists it by name)."""
    page.goto(url, timeout=180_000)
    page.locator("#tabs button, .tab-nav button, button[role=tab]", has_text="Traindeck").first.click()
    page.locator("#traindeck-start").wait_for(timeout=120_000)


def pick_model(page, loaded: str) -> dict:
    """Choose the loaded checkpoint in the tab's Model list; the list's options and what was picked."""
    box = field(page, "traindeck-model")
    box.click()
    options = page.locator("#traindeck-model li")
    options.first.wait_for(timeout=30_000)
    names = [t.strip() for t in options.all_inner_texts()]
    stem = Path(loaded.split(" [")[0]).name
    match = next((n for n in names if n == loaded), None) or next((n for n in names if stem and stem in n), None)
    if match is None:
        page.keyboard.press("Escape")
        raise RuntimeError(f"the loaded checkpoint {loaded!r} is not in the tab's Model list {names}")
    options.filter(has_text=match).first.click()
    page.wait_for_timeout(500)
    return {"options": names, "picked": box.input_value()}


def fill_form(page, data: Path, iters: int, name: str) -> None:
    """LoRA mode and a small, quick job (64 px, rank 4); everything else as the tab starts."""
    page.locator("#traindeck-mode label", has_text="LoRA").first.click()
    values = {"traindeck-lora-data-directory": str(data), "traindeck-image-size": "64",
              "traindeck-train-iterations": str(iters), "traindeck-train-batch-size": "1",
              "traindeck-network-rank": "4", "traindeck-network-alpha": "4",
              "traindeck-train-learning-rate": "0.001", "traindeck-save-lora-name": name}
    for elem_id, value in values.items():
        box = field(page, elem_id)
        box.fill(value)
        box.press("Tab")  # gradio takes a textbox's value on change/blur


def train(page, name: str, timeout: float) -> dict:
    """Press Start Training; every distinct status line until the job ends, and the last message."""
    page.locator("#traindeck-start").click()
    seen: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = field(page, "traindeck-status").input_value()
        if status and (not seen or seen[-1] != status):
            seen.append(status)
        message = field(page, "traindeck-message").input_value()
        finished = status.startswith("idle") and f"last: {name} " in status
        if finished or "error" in message.lower():
            return {"status_lines": seen, "message": message, "final_status": status}
        time.sleep(1)
    return {"status_lines": seen, "message": field(page, "traindeck-message").input_value(), "timeout": True}


def small_png(png: bytes, path: Path, width: int = 900) -> None:
    """The screenshot scaled to `width` and reduced to 64 colours, so it stays small in the repository."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(64).save(path, optimize=True)


def drive(a: argparse.Namespace) -> dict:
    from playwright.sync_api import sync_playwright

    first = txt2img(a.url, PROMPT)
    first.pop("_px", None)
    _, opts = call(a.url, "GET", "/sdapi/v1/options")
    loaded = opts.get("sd_model_checkpoint", "") if isinstance(opts, dict) else ""
    data = make_data(Path(a.work) / "data")
    lora = Path(a.lora_dir or Path(a.webui) / "models" / "Lora") / f"{a.name}.safetensors"
    out: dict = {"first_txt2img": first, "loaded_checkpoint": loaded, "name": a.name, "data": str(data)}
    log = Path(a.log)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            open_tab(page, a.url)
            out["model"] = ({"picked": field(page, "traindeck-model").input_value(), "kept": True}
                            if a.keep_model else pick_model(page, loaded))
            fill_form(page, data, a.iters, a.name)
            pos, started = log.stat().st_size, time.time()
            out.update(train(page, a.name, a.timeout))
            out["wall_s"] = round(time.time() - started, 1)
            out["console"] = console_since(log, pos)
            if a.shot:
                small_png(page.locator("#traindeck-tab-train").screenshot(), Path(a.shot))
        finally:
            browser.close()
    out["lora_file"] = str(lora)
    out["lora_written"] = lora.exists() and lora.stat().st_mtime >= started
    stem = Path(loaded.split(" [")[0]).stem
    out["ok"] = bool(out["lora_written"] and REUSED in out["message"] and stem and stem in out["message"]
                     and " done" in out.get("final_status", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--webui", required=True, help="the WebUI's folder (its models/Lora is the default Lora folder)")
    ap.add_argument("--log", required=True, help="the WebUI's console log file")
    ap.add_argument("--lora-dir", help="the WebUI's --lora-dir, if it was started with one")
    ap.add_argument("--keep-model", action="store_true", help="leave the Model list as the tab opens it")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--name", default=f"tab_{time.strftime('%Y%m%d_%H%M%S')}", help="the LoRA's file name")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    ap.add_argument("--work", default="/tmp/traindeck-host-tab")
    ap.add_argument("--shot", help="where to save a PNG of the tab after the job")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    result = {"what": "tab", "url": a.url, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **drive(a)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ok", "message", "final_status", "lora_written") if k in result}))
    print(f"wrote {a.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
