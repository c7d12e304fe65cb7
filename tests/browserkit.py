"""Helpers for the browser tests: the standalone demo app in a subprocess and gradio's widgets in
Debian's chromium through Playwright (gradio 3.41, 4.40 and 5.x)."""
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


def launch(pw):
    """A headless chromium page the size of a desktop screen."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 1800})


def gradio_line() -> str:
    import gradio

    return f"gradio{gradio.__version__.split('.')[0]}"


def shot(page, name: str) -> None:
    """A full-page screenshot in tests/artifacts/, named for the gradio line it ran under."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}-{gradio_line()}.png"), full_page=True)


def until(check, timeout: float, what: str, every: float = 0.1):
    """Poll `check()` until it returns something true; its value, or AssertionError naming `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")
