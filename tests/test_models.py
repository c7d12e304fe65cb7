"""Model loading: ldm single files, diffusers folders, state dicts, VAE files, safety."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.ldm_export import (assert_frozen, assert_same_model, export_ldm, ldm_yaml, max_diff, outputs,
                              te_out, vae_out, vae_to_ldm, write_single_file)
from tests.tiny import tiny_bundle
from trainer.families import loading as models, single_file
from trainer.families.loading import ModelError, load_from_state_dict, load_model, load_vae_file

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Each family's tiny source bundle, its .safetensors (+ .yaml) and its reference outputs."""
    out = {}
    for fam in FAMILIES:
        src = tiny_bundle(fam, seed=3)
        path = write_single_file(src, tmp_path_factory.mktemp(fam) / f"tiny-{fam}.safetensors")
        out[fam] = (src, path, outputs(src))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(exported, family):
    src, path, ref = exported[family]
    got = load_model(path)
    assert got.family.name == family
    assert got.v_pred is (family == "sd2")  # the SD2 yaml says parameterization: v
    assert got.noise_scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert got.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert got.noise_scheduler.config.num_train_timesteps == 1000
    assert got.name == f"tiny-{family}" and got.source == str(path)
    assert_same_model(src, got, ref)
    assert_frozen(got)


def test_sd2_single_file_uses_penultimate_layer(exported):
    """The file holds one more OpenCLIP block than the encoder keeps (A1111's penultimate layer)."""
    src, path, _ = exported["sd2"]
    keys = {k for k in export_ldm(src) if ".resblocks." in k}
    assert len({k.split(".resblocks.")[1].split(".")[0] for k in keys}) == 3
    assert load_model(path).text_encoders[0].config.num_hidden_layers == 2


def test_dtype_is_applied(exported):
    got = load_model(exported["sd1"][1], dtype=torch.bfloat16)
    assert_frozen(got, torch.bfloat16)


@pytest.mark.parametrize("family", ("sd1", "sdxl"))
def test_diffusers_folder(exported, tmp_path, family):
    src, _, ref = exported[family]
    parts = {"unet": src.unet, "vae": src.vae, "text_encoder": src.text_encoders[0],
             "tokenizer": src.tokenizers[0], "scheduler": src.noise_scheduler}
    if family == "sdxl":
        parts.update(text_encoder_2=src.text_encoders[1], tokenizer_2=src.tokenizers[1])
    for sub, part in parts.items():
        part.save_pretrained(tmp_path / sub)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    got = load_model(tmp_path)
    assert got.family.name == family and got.v_pred is False
    assert [t.pad_token for t in got.tokenizers] == [t.pad_token for t in src.tokenizers]
    assert_same_model(src, got, ref)
    assert_frozen(got)


def test_diffusers_folder_v_pred_and_sd2(exported, tmp_path):
    src, _, ref = exported["sd2"]  # v-prediction scheduler
    for sub, part in {"unet": src.unet, "vae": src.vae, "text_encoder": src.text_encoders[0],
                      "scheduler": src.noise_scheduler}.items():
        part.save_pretrained(tmp_path / sub)
    (tmp_path / "model_index.json").write_text("{}")
    got = load_model(tmp_path)
    assert got.family.name == "sd2" and got.v_pred is True
    assert got.tokenizers[0].pad_token == "!"  # no tokenizer/ folder: the offline OpenCLIP one
    assert_same_model(src, got, ref)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="model_index.json") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_ckpt_loads_weights_only(exported, tmp_path):
    src, _, ref = exported["sd1"]
    got = load_model(write_single_file(src, tmp_path / "m.ckpt"))
    assert got.family.name == "sd1"
    assert_same_model(src, got, ref)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": _Evil(marker)}, bad)
    with pytest.raises(ModelError, match="refused") as err:
        load_model(bad)
    assert str(bad) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("prefix,suffix", [("", ".safetensors"), ("first_stage_model.", ".pt")])
def test_separate_vae_file(exported, tmp_path, prefix, suffix):
    other = tiny_bundle("sd1", seed=11).vae
    vae_path = tmp_path / f"other.vae{suffix}"
    sd = vae_to_ldm(other, prefix=prefix)
    if suffix == ".safetensors":
        save_file(sd, str(vae_path))
    else:
        torch.save({"state_dict": sd}, vae_path)
    src, path, ref = exported["sd1"]
    got = load_model(path, vae=vae_path)
    new = vae_out(got.vae)
    assert max_diff(vae_out(other), new) <= 1e-5
    assert max_diff(ref["vae"], new) > 1e-3  # really replaced
    assert got.vae.config.scaling_factor == pytest.approx(src.vae.config.scaling_factor)
    assert got.extra["vae"] == str(vae_path)


def test_load_vae_file_scaling_factor(tmp_path):
    vae = tiny_bundle("sdxl", seed=2).vae
    save_file(vae_to_ldm(vae, prefix=""), str(tmp_path / "v.safetensors"))
    got = load_vae_file(tmp_path / "v.safetensors", scaling_factor=0.13025)
    assert got.config.scaling_factor == pytest.approx(0.13025)
    assert max_diff(vae_out(vae), vae_out(got)) <= 1e-5
    assert not got.training and not any(p.requires_grad for p in got.parameters())


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("family", ("sd1", "sdxl"))
def test_load_from_state_dict_shares_storage(family):
    src = tiny_bundle(family, seed=8)
    sd = export_ldm(src)
    got = load_from_state_dict(sd, original_config=ldm_yaml(src))
    given = _storages(sd.values())
    assert _storages(got.unet.parameters()) <= given  # no second copy of the U-Net
    assert _storages(got.vae.parameters()) <= given
    assert _storages(got.text_encoders[0].parameters()) <= given  # CLIP-L is a pure rename
    assert got.unet.conv_in.weight.data_ptr() == sd["model.diffusion_model.input_blocks.0.0.weight"].data_ptr()


def test_load_from_state_dict_casts_on_request():
    src = tiny_bundle("sd1", seed=8)
    sd = export_ldm(src)
    got = load_from_state_dict(sd, original_config=ldm_yaml(src), dtype=torch.bfloat16)
    assert got.unet.conv_in.weight.dtype == torch.bfloat16
    assert not _storages(got.unet.parameters()) & _storages(sd.values())
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float32  # input untouched


def test_legacy_sd1_text_encoder_keys():
    """Old SD1 files lack `text_model.` in the CLIP keys; A1111 renames them, so do we."""
    src = tiny_bundle("sd1", seed=9)
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in export_ldm(src).items()}
    got = load_from_state_dict(sd, original_config=ldm_yaml(src))
    assert max_diff(te_out(src.text_encoders[0]), te_out(got.text_encoders[0])) <= 1e-5


# --- family and v-prediction detection -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family_from_ldm_keys(family):
    src = tiny_bundle(family)
    sd = export_ldm(src)
    assert models.detect_family(sd.keys()).name == family
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert models.detect_family(unet_only).name == family  # shapes tell SD1 (conv proj_in) from SD2 (linear)
    assert models.detect_family(src.unet.state_dict()).name == family  # diffusers U-Net layout


def test_detect_family_refuses_other_files():
    with pytest.raises(ModelError, match="lora.safetensors.*not a Stable Diffusion checkpoint"):
        models.detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], name="lora.safetensors")
    with pytest.raises(ModelError, match="refiner"):
        models.detect_family(["model.diffusion_model.out.2.weight", "conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(ModelError, match="SD1 from SD2"):
        models.detect_family(["model.diffusion_model.out.2.weight"])  # keys only, no shapes


def test_v_pred_override(exported):
    got = load_model(exported["sd1"][1], v_pred=True)
    assert got.v_pred is True and got.noise_scheduler.config.prediction_type == "v_prediction"
    # False means "not forced": the SD2 file's own yaml still says v.
    assert load_model(exported["sd2"][1], v_pred=False).v_pred is True


def test_v_pred_from_state_dict_key():
    src = tiny_bundle("sdxl", seed=4)
    sd = export_ldm(src)
    assert load_from_state_dict(sd, original_config=ldm_yaml(src)).v_pred is False
    sd["v_pred"] = torch.tensor([])  # how v-prediction SDXL fine-tunes mark themselves
    got = load_from_state_dict(sd, original_config=ldm_yaml(src))
    assert got.v_pred is True and got.noise_scheduler.config.prediction_type == "v_prediction"


def test_v_pred_from_safetensors_metadata(tmp_path):
    src = tiny_bundle("sd1", seed=4)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in export_ldm(src).items()}, str(path),
              metadata={"modelspec.prediction_type": "v"})
    cfg = ldm_yaml(src)
    path.with_suffix(".yaml").write_text(json.dumps(cfg))  # JSON is valid yaml
    assert load_model(path).v_pred is True


@pytest.mark.parametrize("bias,expected", [(-5.0, True), (5.0, False)])
def test_sd2_without_yaml_uses_a1111_output_test(monkeypatch, bias, expected):
    """No yaml and no marker: an SD2 U-Net whose t=999 output sits far below the input is v-pred."""
    src = tiny_bundle("sd2", seed=2, v_pred=False)
    src.unet.conv_out.bias.data.fill_(bias)
    assert single_file.looks_v_pred(src.unet) is expected
    tiny_cfg = ldm_yaml(src)  # epsilon yaml standing in for the shipped one of the real SD2
    monkeypatch.setattr(models, "default_config", lambda family, v_pred=False: tiny_cfg)
    got = load_from_state_dict(export_ldm(src))
    assert got.v_pred is expected


def test_nonstandard_model_without_yaml_is_a_clear_error(tmp_path):
    path = write_single_file(tiny_bundle("sd1"), tmp_path / "custom.safetensors", with_yaml=False)
    with pytest.raises(ModelError, match=r"\.yaml") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_non_checkpoint_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not tensors")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"\0")
    for bad, why in [(text, "not a readable"), (lora, "not a Stable Diffusion"), (odd, "unknown checkpoint type"),
                     (tmp_path / "missing.safetensors", "no such file")]:
        with pytest.raises(ModelError, match=why) as err:
            load_model(bad)
        assert str(bad) in str(err.value)


@pytest.mark.parametrize("family,v,unet_params", [
    ("sd1", False, 859_520_964), ("sd2", False, 865_910_724), ("sd2", True, 865_910_724),
    ("sdxl", False, 2_567_463_684)])
def test_shipped_configs_describe_the_real_models(family, v, unet_params):
    """The shipped yamls build the real architectures (parameter counts of the released models)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = single_file.default_config(family, v)
    assert (cfg["model"]["params"].get("parameterization") == "v") is v
    unet = single_file.build_empty(lambda: UNet2DConditionModel.from_config(
        single_file.unet_config({}, cfg, family, name="default")))
    vae = single_file.build_empty(lambda: AutoencoderKL.from_config(sfu.create_vae_diffusers_config_from_ldm(cfg, {})))
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)


def test_original_config_as_a_file(tmp_path):
    src = tiny_bundle("sd2", seed=12)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(json.dumps(ldm_yaml(src)))
    got = load_from_state_dict(export_ldm(src), name="mine", original_config=cfg_path)
    assert got.family.name == "sd2" and got.v_pred is True and got.name == "mine"
    with pytest.raises(ModelError, match="nothere.yaml"):
        load_from_state_dict(export_ldm(src), original_config=tmp_path / "nothere.yaml")


def test_inference_tensors_are_copied_into_usable_parameters():
    """A host may keep its weights as inference tensors; those cannot back parameters, so they are copied."""
    src = tiny_bundle("sd1", seed=13)
    with torch.inference_mode():
        sd = {k: v.clone() for k, v in export_ldm(src).items()}
    got = load_from_state_dict(sd, original_config=ldm_yaml(src))
    assert not any(p.is_inference() for p in got.unet.parameters())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    got.unet(x, torch.tensor([5]), torch.randn(1, 77, 32)).sample.sum().backward()  # usable in a training graph
    assert x.grad is not None
