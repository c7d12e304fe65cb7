"""Which fields the Train tab shows for the chosen model's family (no gradio: every profile).

The fields of some families only (the schema's `families`: FLUX's flow options) show for a model
of those families; when the family cannot be told, only while one of them holds a non-default
value (a FLUX preset). The Controller tells the family from the model's file header.
"""
from __future__ import annotations

import pytest

from trainer.config.params import MODES
from trainer.config.presets import load_preset
from trainer.config.schema import TrainConfig
from trainer.hosts.base import StandaloneHost
from trainer.ui import form
from trainer.ui.controller import Controller

from tests.familykit import header_file
from tests.webuikit import fake_webui

FLUX_ONLY = {n for n in form.FAMILY_FIELDS if form.PARAMS[n].families == ("flux",)}
ZIMAGE_ONLY = {n for n in form.FAMILY_FIELDS if form.PARAMS[n].families == ("zimage",)}
DEFAULTS = form.form_values(TrainConfig())


def of_mode(mode: str) -> set[str]:
    return {n for n, p in form.PARAMS.items() if mode in p.modes}


def test_the_family_fields_are_fluxs_and_zimages_flow_options():
    assert FLUX_ONLY | ZIMAGE_ONLY == set(form.FAMILY_FIELDS) == set(form.GROUP_FIELDS["flow"])
    assert {"clip_l", "t5xxl", "ae", "guidance_scale", "timestep_sampling", "model_prediction_type",
            "t5xxl_max_token_length", "apply_t5_attn_mask"} <= FLUX_ONLY
    assert ZIMAGE_ONLY == {"qwen3", "qwen3_max_token_length"}
    assert not (FLUX_ONLY | ZIMAGE_ONLY) & {"network_rank", "train_snr_gamma", "model", "mode"}


@pytest.mark.parametrize("mode", MODES)
def test_flux_fields_show_for_a_flux_model_only(mode):
    assert FLUX_ONLY <= of_mode(mode)  # every mode trains FLUX
    assert ZIMAGE_ONLY <= of_mode(mode)  # and Z-Image
    assert form.visible_fields(mode, "flux", DEFAULTS) == of_mode(mode) - ZIMAGE_ONLY
    assert form.visible_fields(mode, "zimage", DEFAULTS) == of_mode(mode) - FLUX_ONLY
    for family in ("sd1", "sd2", "sdxl"):
        assert form.visible_fields(mode, family, DEFAULTS) == of_mode(mode) - FLUX_ONLY - ZIMAGE_ONLY
    assert form.visible_fields(mode, None, DEFAULTS) == of_mode(mode) - FLUX_ONLY - ZIMAGE_ONLY
    assert form.visible_fields(mode) == of_mode(mode) - FLUX_ONLY - ZIMAGE_ONLY


@pytest.mark.parametrize("preset", ["LoRA_FLUX_dev", "iLECO_FLUX", "ADDifT_FLUX"])
def test_a_flux_preset_shows_them_when_the_family_is_not_known(preset):
    cfg = load_preset(preset)
    values = form.form_values(cfg)
    assert form.families_in_use(values) == {"flux"}
    assert form.visible_fields(cfg.mode, None, values) == of_mode(cfg.mode) - ZIMAGE_ONLY
    # A model known to be SD keeps them hidden, whatever they hold.
    assert not form.visible_fields(cfg.mode, "sdxl", values) & FLUX_ONLY


@pytest.mark.parametrize("change,shown", [
    ({"t5xxl_max_token_length": "512"}, True),
    ({"clip_l": "clip_l.safetensors"}, True),
    ({"apply_t5_attn_mask": True}, True),
    ({"sigmoid_scale": "abc"}, True),  # an entry that does not parse is the user's, not the default
    ({"guidance_scale": "1"}, False),  # the default, written another way
    ({"guidance_scale": ""}, False),   # empty means the default
    ({"discrete_flow_shift": "3.1582"}, False),
    ({"network_rank": "4", "train_snr_gamma": "0"}, False),  # other fields do not count
])
def test_one_changed_flux_field_shows_them_all(change, shown):
    visible = form.visible_fields("LoRA", None, {**DEFAULTS, **change})
    assert (FLUX_ONLY <= visible) is shown and (FLUX_ONLY & visible == set()) is (not shown)
    assert not ZIMAGE_ONLY & visible  # a FLUX field says nothing about Z-Image's


def test_a_changed_zimage_field_shows_zimages_fields_only():
    visible = form.visible_fields("LoRA", None, {**DEFAULTS, "qwen3": "qwen_3_4b.safetensors"})
    assert ZIMAGE_ONLY <= visible and not FLUX_ONLY & visible


def test_every_preset_of_another_family_keeps_them_hidden():
    for name in ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT", "LoRA_Demo"):
        values = form.form_values(load_preset(name))
        assert form.families_in_use(values) == set(), name


@pytest.fixture()
def models(tmp_path):
    folder = tmp_path / "models"
    header_file(folder / "flux1-dev.safetensors", "flux")
    header_file(folder / "sub" / "flux1-schnell.sft", "flux")
    header_file(folder / "sd15.safetensors", "sd1")
    header_file(folder / "xl.safetensors", "sdxl")
    (folder / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    header_file(tmp_path / "elsewhere" / "flux.safetensors", "flux")
    return folder


def test_the_controller_tells_the_family_from_the_file_header(models, tmp_path):
    ctl = Controller(StandaloneHost(tmp_path / "out", [models]), tmp_path / "queue.json", device="cpu")
    try:
        assert ctl.model_family("flux1-dev.safetensors") == "flux"
        assert ctl.model_family("flux1-dev") == "flux"  # a name without its extension, as jobs take it
        assert ctl.model_family("sub/flux1-schnell.sft") == "flux"
        assert ctl.model_family("sd15.safetensors") == "sd1"
        assert ctl.model_family("xl.safetensors") == "sdxl"
        for untold in ("old.ckpt", "broken.safetensors", "missing.safetensors", "", None):
            assert ctl.model_family(untold) is None, untold
        # Only the host's models are read, as for jobs: a path elsewhere is not looked into.
        assert ctl.model_family(str(tmp_path / "elsewhere" / "flux.safetensors")) is None
    finally:
        ctl.close()


def test_an_empty_model_means_the_apps_fallback_model(models, tmp_path):
    ctl = Controller(StandaloneHost(tmp_path / "out", [models]), tmp_path / "queue.json", device="cpu",
                     fallbacks={"model": "flux1-dev.safetensors"})
    try:
        assert ctl.model_family("") == "flux" and ctl.model_family("sd15.safetensors") == "sd1"
    finally:
        ctl.close()


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_in_the_webui_the_family_comes_from_the_checkpoint_file(models, tmp_path, kind):
    """The WebUI lists checkpoint titles; empty means the checkpoint the WebUI has chosen."""
    from trainer.hosts.webui import WebUIHost

    with fake_webui(kind) as webui:
        flux = webui.sd_models.checkpoint_info(models / "flux1-dev.safetensors", "flux1-dev")
        sd = webui.sd_models.checkpoint_info(models / "sd15.safetensors", "sd15")
        webui.sd_models.checkpoints_list.update({flux.title: flux, sd.title: sd})
        ctl = Controller(WebUIHost(), tmp_path / "queue.json", device="cpu")
        try:
            assert ctl.model_family(flux.title) == "flux" and ctl.model_family(sd.title) == "sd1"
            assert ctl.model_family("") is None  # no checkpoint chosen yet
            webui.shared.opts.sd_model_checkpoint = flux.title
            assert ctl.model_family("") == "flux"
            webui.shared.opts.sd_model_checkpoint = sd.title
            assert ctl.model_family("") == "sd1"
            assert ctl.model_family("not listed [0000]") is None
        finally:
            ctl.close()


def test_the_part_pickers_offer_the_hosts_files(models, tmp_path):
    """FLUX's CLIP-L, T5-XXL and autoencoder pickers: files of the app's model and VAE folders (never
    the files inside a diffusers folder), or the host's own list where it keeps one (the WebUI's)."""
    (models / "pipe" / "vae").mkdir(parents=True)
    (models / "pipe" / "model_index.json").write_text("{}")
    (models / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    vaes = tmp_path / "vaes"
    header_file(vaes / "ae.safetensors", "flux")
    ctl = Controller(StandaloneHost(tmp_path / "out", [models], [vaes]), tmp_path / "queue.json", device="cpu")
    try:
        files = ctl.part_files()
        assert {"flux1-dev.safetensors", "sd15.safetensors", "old.ckpt", "ae.safetensors"} <= set(files)
        assert not any(f.startswith("pipe") for f in files)
    finally:
        ctl.close()

    class Listing(StandaloneHost):
        def list_components(self) -> list[str]:
            return ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]

    ctl = Controller(Listing(tmp_path / "out", [models]), tmp_path / "queue.json", device="cpu")
    try:
        assert ctl.part_files() == ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
    finally:
        ctl.close()
