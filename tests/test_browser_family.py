"""In a real browser (gradio 3.41 and 4.40): FLUX's own settings appear only for a FLUX model.

The standalone app starts on the demo model (a diffusers folder that names no family): the FLUX
group is hidden; a FLUX preset shows it; an SD checkpoint hides it again, even with the preset's
values in it; a FLUX.1 file (told by its header) shows it. Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import pytest

from tests.browserkit import field, launch, pick, server, shot, until, wait_text  # noqa: F401 (fixture)
from tests.familykit import header_file

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def shown(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").first.is_visible()


def flux_group(page, wanted: bool, what: str) -> None:
    until(lambda: shown(page, "traindeck-group-flow") is wanted, 20, what)


def test_flux_settings_follow_the_chosen_model(server):
    from playwright.sync_api import sync_playwright

    url, tmp = server
    models = tmp / "no-models"  # the app's model folder (the demo's is added to it)
    header_file(models / "flux1-dev.safetensors", "flux")
    header_file(models / "sd15.safetensors", "sd1")
    with sync_playwright() as pw:
        browser, page = launch(pw)
        page.goto(url)
        page.locator("#traindeck-add").wait_for(timeout=60_000)
        assert not shown(page, "traindeck-group-flow") and not shown(page, "traindeck-timestep-sampling")
        assert shown(page, "traindeck-group-network")  # the other groups are there
        shot(page, "family-0-sd-demo")

        pick(page, "traindeck-preset", "LoRA_FLUX_dev")
        page.locator("#traindeck-load-preset").click()
        wait_text(page, "traindeck-message", "loaded preset LoRA_FLUX_dev", 30)
        flux_group(page, True, "a FLUX preset to show the FLUX group (the demo model names no family)")
        page.locator("#traindeck-group-flow .label-wrap").first.click()
        page.locator("#traindeck-timestep-sampling").wait_for(state="visible", timeout=10_000)
        assert field(page, "traindeck-timestep-sampling").input_value() == "flux_shift"
        assert field(page, "traindeck-t5xxl-max-token-length").input_value() == "512"
        shot(page, "family-1-flux-preset")

        page.locator("#traindeck-refresh-models").click()
        pick(page, "traindeck-model", "sd15.safetensors")
        flux_group(page, False, "an SD1 checkpoint to hide the FLUX group")
        assert not shown(page, "traindeck-timestep-sampling")
        shot(page, "family-2-sd-file")

        pick(page, "traindeck-model", "flux1-dev.safetensors")
        flux_group(page, True, "a FLUX.1 file to show the FLUX group")
        page.locator("#traindeck-timestep-sampling").wait_for(state="visible", timeout=10_000)
        assert shown(page, "traindeck-clip-l") and shown(page, "traindeck-guidance-scale")
        shot(page, "family-3-flux-file")
        browser.close()
