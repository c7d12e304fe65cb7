"""The standalone app's stack: run_ui.py installs gradio 5, a diffusers with Z-Image and a transformers
with Qwen3 (the `latest` profile), while the hosts' profiles keep gradio 3.41 and 4.40."""
from __future__ import annotations

from importlib import metadata

import pytest

import run_ui
from tests import run_profiles as rp

# The first releases with what the app needs: diffusers' ZImageTransformer2DModel (0.36.0) and
# transformers' Qwen3 (4.51.0, Z-Image's text encoder).
Z_IMAGE_DIFFUSERS, QWEN3_TRANSFORMERS = "0.36.0", "4.51.0"
# Which profile each gradio line's tests run in (the hosts' pins, and the app's).
GRADIO_PROFILES = {3: "a1111", 4: "forge", 5: run_ui.PROFILE}


def pins(name: str) -> dict[str, str]:
    return dict(rp.profile_pins(rp.PROFILES[name]))


def admits(spec: str, version: str) -> bool:
    return rp.install.satisfies(version, spec)


def test_run_ui_installs_a_profile_with_the_ui_and_browser_tools():
    profile = rp.PROFILES[run_ui.PROFILE]
    assert profile.ui and rp.REQ / "test-ui.txt" in rp.test_requirements(profile)
    assert "-m" not in profile.select  # the profile runs the UI and browser tests too


def test_the_apps_requirements_give_gradio_5_z_image_and_qwen3():
    app = pins(run_ui.PROFILE)
    assert admits(app["gradio"], "5.50.0")
    assert not admits(app["gradio"], "4.44.1") and not admits(app["gradio"], "6.0.0")
    assert admits(app["diffusers"], "0.42.1") and not admits(app["diffusers"], "0.35.2")
    lowest = app["transformers"].split(",")[0]
    assert lowest.startswith(">=") and admits(f">={QWEN3_TRANSFORMERS}", lowest[2:])
    assert {"accelerate", "safetensors"} <= set(app)
    assert "torch" not in app and "torchvision" not in app  # torch comes from constraints-torch.txt only
    assert "torch==2.13.0" in rp.TORCH_CONSTRAINTS.read_text(encoding="utf-8").split()


def test_the_hosts_keep_their_gradio():
    assert pins("a1111")["gradio"] == "==3.41.2"
    assert pins("forge")["gradio"] == "==4.40.0"


@pytest.mark.ui
def test_the_installed_gradio_line_runs_on_its_profiles_stack():
    """In the profile venvs: the gradio line found here is its profile's, every pin of that profile
    holds, and only the app's stack (gradio 5) has Z-Image's transformer and Qwen3."""
    import diffusers
    import gradio
    import transformers

    profile = GRADIO_PROFILES[int(gradio.__version__.split(".")[0])]
    wrong = [(name, spec, metadata.version(name)) for name, spec in pins(profile).items()
             if spec and not admits(spec, metadata.version(name))]
    assert wrong == [], f"the {profile} profile's pins do not hold here"
    has_z_image = hasattr(diffusers, "ZImageTransformer2DModel")
    if profile == run_ui.PROFILE:
        from diffusers import ZImageTransformer2DModel  # noqa: F401 (the import is the check)
        from transformers import Qwen3Config, Qwen3Model  # noqa: F401

        assert has_z_image and admits(f">={Z_IMAGE_DIFFUSERS}", diffusers.__version__)
        assert admits(f">={QWEN3_TRANSFORMERS}", transformers.__version__)
    else:  # the hosts pin diffusers 0.31: a Z-Image model must be refused there
        assert not has_z_image and not admits(f">={Z_IMAGE_DIFFUSERS}", diffusers.__version__)
