"""The standalone demo in a real browser (Debian's chromium through Playwright)."""
from __future__ import annotations

import pytest

from tests.browserkit import ARTIFACTS, field, launch, pick, server, status, tab, wait_text  # noqa: F401 (fixture)

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def test_demo_trains_plots_and_queues_in_a_browser(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser, page = launch(pw)
        page.goto(url)
        page.locator("#traindeck-start").wait_for(timeout=60_000)
        pick(page, "traindeck-preset", "LoRA")
        page.locator("#traindeck-load-preset").click()
        wait_text(page, "traindeck-message", "loaded preset LoRA", 30)
        field(page, "traindeck-train-iterations").fill("20")
        field(page, "traindeck-save-lora-name").fill("browser")
        page.locator("#traindeck-start").click()
        wait_text(page, "traindeck-message", "browser", 30)  # queued, then started: the latest event
        wait_text(page, "traindeck-status", "browser done", 300)
        wait_text(page, "traindeck-message", "browser done: saved", 30)
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
