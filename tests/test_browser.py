"""The standalone demo in a real browser (Debian's chromium through Playwright)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from trainer.paths import ROOT

pytestmark = [pytest.mark.ui, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    """The standalone app on the demo model, with every folder it writes under tmp_path."""
    port = free_port()
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    env = {**os.environ, "TRAINDECK_LOGS": str(tmp_path / "logs"), "TRAINDECK_JSONS": str(tmp_path / "jsons"),
           "TRAINDECK_PRESETS": str(tmp_path / "presets"), "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "trainer.ui", "--demo", "--port", str(port), "--device", "cpu",
           "--lora-dir", str(tmp_path / "out"), "--queue", str(tmp_path / "queue.json"),
           "--models", str(tmp_path / "no-models")]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        yield url, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def pick(page, elem_id: str, text: str) -> None:
    """Choose `text` in a gradio dropdown (3.x and 4.x both list options under the input)."""
    box = field(page, elem_id)
    box.click()
    box.fill(text)
    page.locator(f"#{elem_id} li", has_text=text).first.click()


def tab(page, name: str) -> None:
    """Open a tab: 4.x marks tab buttons role=tab, 3.x puts plain buttons in .tab-nav."""
    page.locator(".tab-nav button, button[role=tab]", has_text=name).first.click()


def status(page, elem_id: str = "traindeck-status") -> str:
    return field(page, elem_id).input_value()


def wait_text(page, elem_id: str, wanted: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = status(page, elem_id)
        if wanted in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{elem_id} never showed {wanted!r}; last: {status(page, elem_id)!r}")


def test_demo_trains_plots_and_queues_in_a_browser(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        page.locator("#traindeck-start").wait_for(timeout=60_000)
        pick(page, "traindeck-preset", "LoRA")
        page.locator("#traindeck-load-preset").click()
        wait_text(page, "traindeck-message", "loaded preset LoRA", 30)
        field(page, "traindeck-train-iterations").fill("20")
        field(page, "traindeck-save-lora-name").fill("browser")
        page.locator("#traindeck-start").click()
        wait_text(page, "traindeck-message", "queued browser", 30)
        wait_text(page, "traindeck-status", "browser done", 300)
        assert (tmp / "out" / "browser.safetensors").is_file()
        page.screenshot(path=str(ARTIFACTS / "ui-train.png"), full_page=True)

        tab(page, "Plot")
        page.locator("#traindeck-plot-refresh").click()
        wait_text(page, "traindeck-plot-message", ": 20 steps", 30)  # the finished log, drawn
        page.locator("#traindeck-plot img").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "ui-plot.png"), full_page=True)

        tab(page, "Train")
        for name in ("first", "second"):
            field(page, "traindeck-save-lora-name").fill(name)
            page.locator("#traindeck-add").click()
            wait_text(page, "traindeck-message", f"added {name}", 30)
        tab(page, "Queue")
        page.locator("#traindeck-queue-refresh").click()
        table = page.locator("#traindeck-queue-table")
        table.get_by_text("second").first.wait_for(timeout=30_000)
        pick(page, "traindeck-queue-job", "first")
        page.locator("#traindeck-queue-delete").click()
        wait_text(page, "traindeck-queue-message", "deleted", 30)
        page.screenshot(path=str(ARTIFACTS / "ui-queue.png"), full_page=True)
        rows = table.inner_text()
        assert "second" in rows and "browser" in rows and "first" not in rows
        browser.close()
