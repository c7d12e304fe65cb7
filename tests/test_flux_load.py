"""FLUX.1 files written from tiny in-memory parts load back to the same weights and outputs."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tests.flux_tiny import (clip_l_state_dict, diffusers_to_bfl, diffusers_vae_to_ldm, flux_forward,
                             save_bfl_transformer, save_flux_files, save_flux_folder, tiny_flux, tiny_t5_tokenizer)
from tests.tiny import tiny_vae
from trainer.families import flux_load as fl
from trainer.families import flux_parts as fp

FP8 = torch.float8_e4m3fn
PROMPTS = ["a photo of a cat", "sks person, painting of a red tree!"]


def assert_same_weights(expected: torch.nn.Module, got: torch.nn.Module, transform=lambda t: t) -> None:
    a, b = expected.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for key, value in a.items():
        want = transform(value) if value.is_floating_point() else value
        assert b[key].dtype == want.dtype, key
        assert torch.equal(b[key], want), key


@pytest.fixture(scope="module", params=["dev", "schnell"])
def written(request, tmp_path_factory):
    parts = tiny_flux(request.param)
    return parts, save_flux_files(parts, tmp_path_factory.mktemp(request.param))


def test_variant_told_apart_by_keys(written):
    parts, files = written
    keys = fl.read_keys(files["transformer"], role="transformer")
    assert fl.is_flux_state_dict(keys)
    assert ("guidance_in.in_layer.weight" in keys) == (parts.variant == "dev")
    assert fl.flux_variant(keys) == parts.variant
    assert fl.flux_variant(["model.diffusion_model." + k for k in keys]) == parts.variant
    for other in ("clip_l", "t5xxl", "ae"):
        assert not fl.is_flux_state_dict(fl.read_keys(files[other], role=other))
    with pytest.raises(fl.FluxLoadError, match="not a FLUX.1 transformer .*text_model"):
        fl.flux_variant(fl.read_keys(files["clip_l"], role="clip_l"))


def test_transformer_single_file_equals_tiny(written):
    parts, files = written
    model = fl.load_flux_transformer(files["transformer"], dtype=torch.float32)
    assert model.config.guidance_embeds == (parts.variant == "dev")
    assert (model.config.num_layers, model.config.num_single_layers) == (2, 2)
    assert tuple(model.config.axes_dims_rope) == (4, 14, 14)
    assert_same_weights(parts.transformer, model)
    assert not any(p.requires_grad for p in model.parameters())
    diff = (flux_forward(model, parts.variant) - flux_forward(parts.transformer, parts.variant)).abs().max()
    assert diff <= 1e-6


def test_sft_file_with_checkpoint_prefix_in_bf16(tmp_path):
    """ComfyUI's all-in-one files nest the transformer under model.diffusion_model.; .sft is safetensors."""
    parts = tiny_flux("schnell")
    path = save_bfl_transformer(parts.transformer, tmp_path / "flux1-schnell.sft", torch.bfloat16,
                                prefix="model.diffusion_model.")
    model = fl.load_flux_transformer(path, dtype=torch.bfloat16)
    assert_same_weights(parts.transformer, model, lambda t: t.to(torch.bfloat16))


def test_all_in_one_checkpoint_serves_every_slot(tmp_path):
    """ComfyUI's checkpoint files hold every part, each under its own prefix."""
    parts = tiny_flux("dev")
    files = save_flux_files(parts, tmp_path / "parts")
    prefixes = {"transformer": "model.diffusion_model.", "clip_l": "text_encoders.clip_l.transformer.",
                "t5xxl": "text_encoders.t5xxl.transformer.", "ae": "vae."}
    merged = {prefixes[role] + k: v for role, path in files.items() for k, v in load_file(str(path)).items()}
    path = tmp_path / "flux1-dev-checkpoint.safetensors"
    save_file(merged, str(path))
    assert fl.flux_variant(fl.read_keys(path, role="model")) == "dev"
    assert_same_weights(parts.transformer, fl.load_flux_transformer(path, dtype=torch.float32))
    comps = fp.load_flux_components(path, path, path, dtype=torch.float32)
    for name in ("clip_l", "t5xxl", "vae"):
        assert_same_weights(getattr(parts, name), getattr(comps, name))


def test_fp8_file_is_upcast_to_the_rounded_weights(tmp_path):
    parts = tiny_flux("dev")
    path = save_bfl_transformer(parts.transformer, tmp_path / "flux1-dev-fp8.safetensors", FP8)
    assert {t.dtype for t in load_file(str(path)).values()} == {FP8}
    model = fl.load_flux_transformer(path, dtype=torch.float32)
    rounded = lambda t: t.to(FP8).to(torch.float32)  # noqa: E731
    assert_same_weights(parts.transformer, model, rounded)
    reference = tiny_flux("dev").transformer
    reference.load_state_dict({k: rounded(v) for k, v in parts.transformer.state_dict().items()})
    diff = (flux_forward(model, "dev") - flux_forward(reference, "dev")).abs().max()
    assert diff <= 1e-6
    assert not torch.equal(flux_forward(model, "dev"), flux_forward(parts.transformer, "dev"))


def test_fp8_storage_kept_when_asked(tmp_path):
    parts = tiny_flux("schnell")
    path = save_bfl_transformer(parts.transformer, tmp_path / "flux1-schnell-fp8.safetensors", FP8)
    model = fl.load_flux_transformer(path, dtype=torch.bfloat16, keep_fp8=True)
    assert {p.dtype for p in model.parameters()} == {FP8}
    assert_same_weights(parts.transformer, model, lambda t: t.to(FP8))


def test_separate_component_files_equal_tiny(written):
    parts, files = written
    comps = fp.load_flux_components(files["clip_l"], files["t5xxl"], files["ae"], dtype=torch.float32)
    assert_same_weights(parts.clip_l, comps.clip_l)
    assert_same_weights(parts.t5xxl, comps.t5xxl)
    assert_same_weights(parts.vae, comps.vae)
    assert (comps.vae.config.scaling_factor, comps.vae.config.shift_factor) == (0.3611, 0.1159)
    assert comps.vae.config.latent_channels == 16 and comps.vae.quant_conv is None
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with torch.no_grad():
        for name, model in (("clip_l", comps.clip_l), ("t5xxl", comps.t5xxl)):
            toks = ids if name == "clip_l" else tiny_t5_tokenizer()(PROMPTS[1], return_tensors="pt").input_ids
            want = getattr(parts, name)(toks)
            got = model(toks)
            assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= 1e-6
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        latent = comps.vae.encode(image).latent_dist.mean
        assert latent.shape == (1, 16, 4, 4)
        assert (latent - parts.vae.encode(image).latent_dist.mean).abs().max() <= 1e-6
        assert (comps.vae.decode(latent).sample - parts.vae.decode(latent).sample).abs().max() <= 1e-6


def test_fp8_text_encoder_files_are_upcast(tmp_path):
    parts = tiny_flux("dev")
    files = save_flux_files(parts, tmp_path, FP8)
    comps = fp.load_flux_components(files["clip_l"], files["t5xxl"], files["ae"], dtype=torch.bfloat16)
    rounded = lambda t: t.to(FP8).to(torch.bfloat16)  # noqa: E731
    assert_same_weights(parts.t5xxl, comps.t5xxl, rounded)
    assert_same_weights(parts.clip_l, comps.clip_l, rounded)


def test_diffusers_folder_equals_tiny(written, tmp_path):
    parts, _ = written
    folder = save_flux_folder(parts, tmp_path / "FLUX.1-tiny")
    got = fp.load_flux_folder(folder, dtype=torch.float32)
    assert got.variant == parts.variant
    for name in ("transformer", "clip_l", "t5xxl", "vae"):
        assert_same_weights(getattr(parts, name), getattr(got, name))
    diff = flux_forward(got.transformer, parts.variant) - flux_forward(parts.transformer, parts.variant)
    assert diff.abs().max() <= 1e-6
    assert got.t5_tokenizer.model_max_length == fl.T5_MAX_LENGTH[parts.variant]
    assert got.t5_tokenizer(PROMPTS).input_ids == tiny_t5_tokenizer()(PROMPTS).input_ids
    assert got.clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert got.scheduler.config.shift == (3.0 if parts.variant == "dev" else 1.0)
    assert got.scheduler.config.use_dynamic_shifting == (parts.variant == "dev")


def test_t5_tokenizer_found_in_the_first_place_that_has_one(tmp_path):
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    folder = tmp_path / "FLUX.1-dev" / "tokenizer_2"
    tiny_t5_tokenizer().save_pretrained(str(folder))
    later = tmp_path / "later.json"
    later.write_bytes((folder / "tokenizer.json").read_bytes())
    assert fp.find_t5_tokenizer([missing, empty, folder, later]) == folder
    assert fp.find_t5_tokenizer([missing, later, folder]) == later
    for found in (folder, later):
        tok = fp.load_t5_tokenizer(found, max_length=256)
        assert tok(PROMPTS).input_ids == tiny_t5_tokenizer()(PROMPTS).input_ids
        assert tok(PROMPTS[0]).input_ids[-1] == 1  # </s>
        padded = tok(PROMPTS[0], padding="max_length", max_length=256, truncation=True).input_ids
        assert len(padded) == 256 and padded[-1] == 0  # <pad>
    with pytest.raises(fl.FluxLoadError) as err:
        fp.find_t5_tokenizer([missing, empty])
    assert str(missing) in str(err.value) and str(empty) in str(err.value)
    assert "tokenizer.json or spiece.model" in str(err.value)


def test_tokenizer_json_of_newer_tokenizers_loads_everywhere(tmp_path):
    """tokenizers >= 0.19 write Metaspace with prepend_scheme/split and no add_prefix_space (so does the
    T5 tokenizer.json some packages ship); A1111's tokenizers 0.13 cannot parse that as it is."""
    folder = tmp_path / "tok"
    tiny_t5_tokenizer().save_pretrained(str(folder))
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for part in ("pre_tokenizer", "decoder"):
        data[part] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data), encoding="utf-8")
    tok = fp.load_t5_tokenizer(newer)
    assert tok(PROMPTS).input_ids == tiny_t5_tokenizer()(PROMPTS).input_ids
    assert tok.decode(tok(PROMPTS[0]).input_ids, skip_special_tokens=True) == PROMPTS[0]


def test_forge_install_places_searched(tmp_path):
    places = fp.forge_t5_tokenizers(tmp_path)
    assert places[0] == tmp_path / "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2"
    tiny_t5_tokenizer().save_pretrained(str(places[1]))
    assert fp.find_t5_tokenizer(places) == places[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_flux_files(tiny_flux("dev"), tmp_path_factory.mktemp("files"))


@pytest.mark.parametrize("role, source, message", [
    ("transformer", "clip_l", r"transformer: .*clip_l.safetensors holds no FLUX.1 transformer weights in BFL "
                              r"layout \(found keys like text_model"),
    ("t5xxl", "clip_l", r"t5xxl: .*clip_l.safetensors holds no T5 encoder weights \(found keys like text_model"),
    ("clip_l", "t5xxl", r"clip_l: .*t5xxl_fp16.safetensors holds no CLIP text encoder weights .*found keys like "
                        r"encoder.block"),
    ("ae", "transformer", r"ae: .*flux1-dev.safetensors holds no autoencoder weights \(found keys like double_blocks"),
])
def test_wrong_file_in_a_slot_is_named(files, role, source, message):
    clip, t5, ae = (files[source] if r == role else files[r] for r in ("clip_l", "t5xxl", "ae"))
    with pytest.raises(fl.FluxLoadError, match=message):
        if role == "transformer":
            fl.load_flux_transformer(files[source])
        else:
            fp.load_flux_components(clip, t5, ae)


def test_sd_vae_refused_as_flux_ae(files, tmp_path):
    sd_vae = tmp_path / "vae-ft-mse.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_vae_to_ldm(tiny_vae()).items()}, str(sd_vae))
    with pytest.raises(fl.FluxLoadError, match=r"ae: .*vae-ft-mse.safetensors is a 4-channel VAE"):
        fp.load_flux_components(files["clip_l"], files["t5xxl"], sd_vae)


def _rewrite(src, dst, edit):
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst))
    return dst


def test_unusable_files_are_named(files, tmp_path):
    cases = {
        tmp_path / "none.safetensors": "does not exist",
        tmp_path / "t5-Q8_0.gguf": r"is a .gguf file; FLUX parts are read from .safetensors",
        tmp_path / "junk.safetensors": "is not a readable safetensors file",
        _rewrite(files["transformer"], tmp_path / "fill.safetensors",
                 lambda sd: sd.update({"img_in.weight": torch.zeros(64, 384)})): "takes 384 input channels",
        _rewrite(files["transformer"], tmp_path / "cut.safetensors",
                 lambda sd: sd.pop("double_blocks.1.txt_mlp.2.bias")): r"is incomplete \(no double_blocks.1.txt_mlp.2",
        _rewrite(files["transformer"], tmp_path / "no-qk-norm.safetensors",
                 lambda sd: sd.pop("double_blocks.0.img_attn.norm.query_norm.scale")):
            r"is incomplete \(no double_blocks.0",
        _rewrite(files["transformer"], tmp_path / "extra.safetensors",
                 lambda sd: sd.update({"double_blocks.0.lora_A": torch.zeros(1)})): r"has keys FLUX.1 does not have",
        _rewrite(files["transformer"], tmp_path / "scaled.safetensors",
                 lambda sd: sd.update({"scaled_fp8": torch.zeros(1)})): "scaled fp8",
    }
    (tmp_path / "t5-Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    for path, message in cases.items():
        with pytest.raises(fl.FluxLoadError, match=message) as err:
            fl.load_flux_transformer(path)
        assert str(err.value).startswith(f"transformer: {path}")


def test_folder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(fl.FluxLoadError, match=r"model: .* is not a diffusers folder \(no model_index.json\)"):
        fp.load_flux_folder(tmp_path)
    folder = save_flux_folder(tiny_flux("schnell"), tmp_path / "flux")
    for file in (folder / "tokenizer_2").iterdir():
        file.unlink()
    with pytest.raises(fl.FluxLoadError, match=r"no T5 tokenizer .* found in:\n  .*tokenizer_2"):
        fp.load_flux_folder(folder)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(fl.FluxLoadError, match=r"vae: .*vae could not be loaded"):
        fp.load_flux_folder(folder)


def test_unreadable_t5_tokenizer_is_named(tmp_path):
    bad = tmp_path / "tokenizer_2"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "Nothing"}}', encoding="utf-8")
    with pytest.raises(fl.FluxLoadError, match=r"t5 tokenizer: .*tokenizer_2 could not be read"):
        fp.load_t5_tokenizer(fp.find_t5_tokenizer([bad]))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_full_size_layout_read_off_shapes(variant, tmp_path):
    """FLUX.1's real sizes (on the meta device): the config read off the shapes is the published one
    (FLUX.1-dev/transformer/config.json) and diffusers' converter gives every tensor its shape."""
    published = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "guidance_embeds": variant == "dev", "axes_dims_rope": (16, 56, 56)}
    with init_empty_weights():
        model = FluxTransformer2DModel(**published)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bfl = diffusers_to_bfl(model.state_dict())
    assert fl.flux_variant(bfl) == variant
    config = fl.transformer_config(bfl, tmp_path)
    assert config == published
    converted = fl.bfl_to_diffusers(bfl, config, tmp_path)
    assert {k: tuple(v.shape) for k, v in converted.items()} == want


def test_full_size_components_read_off_shapes(tmp_path):
    """FLUX.1's CLIP-L, T5-XXL and autoencoder (on the meta device, in the file layouts): the configs read
    off the shapes match FLUX.1-dev's text_encoder, text_encoder_2 and vae config.json."""
    t5_published = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                    "num_heads": 64, "relative_attention_num_buckets": 32, "dense_act_fn": "gelu_pytorch_tanh",
                    "layer_norm_epsilon": 1e-6}
    clip_published = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
    ae_published = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16,
                    "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611,
                    "shift_factor": 0.1159, "mid_block_add_attention": True, "norm_num_groups": 32}
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **t5_published))
        clip = CLIPTextModel(CLIPTextConfig(**clip_published))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **ae_published)
    t5_cfg = fp.t5_config(t5.state_dict())
    assert {k: getattr(t5_cfg, k) for k in t5_published} == t5_published and t5_cfg.is_gated_act
    clip_sd = {k[len("text_model."):]: v for k, v in clip_l_state_dict(clip).items() if k.startswith("text_model.")}
    clip_cfg = fp.clip_l_config(clip_sd)
    assert {k: getattr(clip_cfg, k) for k in clip_published} == clip_published
    ae_cfg = fp.ae_config(diffusers_vae_to_ldm(vae), tmp_path)
    assert {k: ae_cfg[k] for k in ae_published} == ae_published


def test_incomplete_component_file_is_named(files, tmp_path):
    cut = _rewrite(files["t5xxl"], tmp_path / "t5-cut.safetensors",
                   lambda sd: sd.pop("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"))
    with pytest.raises(fl.FluxLoadError, match=r"t5xxl: .*t5-cut.safetensors is incomplete \(no encoder.block.0"):
        fp.load_flux_components(files["clip_l"], cut, files["ae"])
