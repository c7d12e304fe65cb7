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

FAMILY = set(form.FAMILY_FIELDS)


def fields_of(*families: str) -> set[str]:
    """The family fields used by exactly these families."""
    return {n for n in FAMILY if set(form.PARAMS[n].families) == set(families)}


def shown_for(family: str) -> set[str]:
    return {n for n in FAMILY if family in form.PARAMS[n].families}


FLUX_ONLY, SD3_ONLY, ZIMAGE_ONLY = fields_of("flux"), fields_of("sd3"), fields_of("zimage")
FLUX_FIELDS = shown_for("flux")
DEFAULTS = form.form_values(TrainConfig())


def of_mode(mode: str) -> set[str]:
    return {n for n, p in form.PARAMS.items() if mode in p.modes}


def test_the_family_fields_are_the_flow_options_of_flux_sd3_and_zimage():
    assert FAMILY == set(form.GROUP_FIELDS["flow"]) == FLUX_FIELDS | shown_for("sd3") | shown_for("zimage")
    assert {"guidance_scale", "blocks_to_swap", "fp8_base", "split_qkv", "train_t5xxl"} <= FLUX_ONLY
    assert fields_of("flux", "sd3") == {"clip_l", "t5xxl", "ae", "t5xxl_max_token_length", "apply_t5_attn_mask"}
    assert fields_of("flux", "zimage") == {"timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
                                           "model_prediction_type"}
    assert fields_of("flux", "sd3", "zimage") == {"weighting_scheme", "logit_mean", "logit_std", "mode_scale"}
    assert SD3_ONLY == {"clip_g", "training_shift"}
    assert ZIMAGE_ONLY == {"qwen3", "qwen3_max_token_length"}
    assert not FAMILY & {"network_rank", "train_snr_gamma", "model", "mode"}


@pytest.mark.parametrize("mode", MODES)
def test_each_familys_fields_show_for_a_model_of_that_family_only(mode):
    assert FAMILY <= of_mode(mode)  # every mode trains FLUX, SD3 and Z-Image
    for family in ("flux", "sd3", "zimage"):
        assert form.visible_fields(mode, family, DEFAULTS) == of_mode(mode) - (FAMILY - shown_for(family)), family
    for family in ("sd1", "sd2", "sdxl"):
        assert form.visible_fields(mode, family, DEFAULTS) == of_mode(mode) - FAMILY
    assert form.visible_fields(mode, None, DEFAULTS) == of_mode(mode) - FAMILY
    assert form.visible_fields(mode) == of_mode(mode) - FAMILY


@pytest.mark.parametrize("preset", ["LoRA_FLUX_dev", "iLECO_FLUX", "ADDifT_FLUX"])
def test_a_flux_preset_shows_them_when_the_family_is_not_known(preset):
    cfg = load_preset(preset)
    values = form.form_values(cfg)
    assert "flux" in form.families_in_use(values)
    assert FLUX_FIELDS <= form.visible_fields(cfg.mode, None, values)
    # A model known to be SD keeps them hidden, whatever they hold.
    assert not form.visible_fields(cfg.mode, "sdxl", values) & FAMILY


@pytest.mark.parametrize("change,shown", [
    ({"guidance_scale": "abc"}, True),  # an entry that does not parse is the user's, not the default
    ({"guidance_scale": "1"}, False),  # the default, written another way
    ({"guidance_scale": ""}, False),   # empty means the default
    ({"blocks_to_swap": "0"}, False),
    ({"network_rank": "4", "train_snr_gamma": "0"}, False),  # other fields do not count
])
def test_one_changed_flux_field_shows_them_all(change, shown):
    visible = form.visible_fields("LoRA", None, {**DEFAULTS, **change})
    assert (FLUX_FIELDS <= visible) is shown and (FAMILY & visible == set()) is (not shown)
    assert not (SD3_ONLY | ZIMAGE_ONLY) & visible  # a FLUX-only field says nothing of SD3 or Z-Image


@pytest.mark.parametrize("change,families", [
    ({"t5xxl_max_token_length": "512"}, {"flux", "sd3"}),  # a field two families have shows both sets
    ({"clip_l": "clip_l.safetensors"}, {"flux", "sd3"}),
    ({"discrete_flow_shift": "3"}, {"flux", "zimage"}),
    ({"logit_std": "1.5"}, {"flux", "sd3", "zimage"}),
    ({"clip_g": "clip_g.safetensors"}, {"sd3"}),
    ({"training_shift": "3"}, {"sd3"}),
    ({"qwen3": "qwen_3_4b.safetensors"}, {"zimage"}),
    ({"qwen3_max_token_length": "256"}, {"zimage"}),
])
def test_a_changed_field_shows_the_fields_of_its_families(change, families):
    values = {**DEFAULTS, **change}
    assert form.families_in_use(values) == families
    visible = form.visible_fields("LoRA", None, values)
    assert visible & FAMILY == set().union(*(shown_for(f) for f in families))


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
