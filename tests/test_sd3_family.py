"""SD3 / SD3.5 through the one engine: every mode trains a tiny SD3.5, the loss falls, iLECO erases,
files hold sd-scripts' SAI keys and SD3 metadata, and a file or a saved state resumes."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config.params import ConfigError
from trainer.data.pairs import single_pair
from trainer.families import detect_family, get_family
from trainer.families.sd3 import SD3
from trainer.families.textenc import encode_prompts
from trainer.training.engine import Trainer

from tests.enginekit import MemoryHost
from tests.flux_tiny import diffusers_to_bfl, tiny_flux_bundle
from tests.modekit import loaded, mode_job, mse, write_pair
from tests.sd3_tiny import diffusers_to_sai, tiny_sd3_bundle
from tests.tiny import tiny_unet

FAST = dict(t5xxl_max_token_length=8, train_snr_gamma=0.0)


def sd3_job(tmp_path, mode: str, **over):
    orig, targ = write_pair(tmp_path / "pair", target_suffix="_t")
    base = dict(FAST, original_prompt="a photo of a cat", target_prompt="a photo of a dog",
                diff_original_image=str(orig), diff_target_image=str(targ),
                lora_data_directory=str(tmp_path / "pair"), diff_target_name="_t")
    base.update(over)
    return mode_job(tmp_path, mode, **base)


def test_sd3_is_told_apart_from_flux_and_the_sd_families():
    sd = tiny_sd3_bundle().unet.state_dict()
    assert detect_family(sd) is get_family("sd3")
    assert detect_family(diffusers_to_sai(sd)).name == "sd3"
    assert detect_family({f"model.diffusion_model.{k}": v for k, v in diffusers_to_sai(sd).items()}).name == "sd3"
    flux = tiny_flux_bundle().unet.state_dict()
    assert detect_family(flux).name == "flux" and detect_family(diffusers_to_bfl(flux)).name == "flux"
    for family in ("sd1", "sdxl"):
        assert detect_family(tiny_unet(family).state_dict()).name == family


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_trains_sd3_and_writes_sd_scripts_keys(tmp_path, logs, mode):
    cfg = sd3_job(tmp_path, mode, train_iterations=2)
    host = MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle())
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 2 and result.output.is_file()
    assert math.isfinite(result.loss_first) and math.isfinite(result.loss_last)
    modules = {k.split(".")[0] for k in load_file(str(result.output))}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_joint_blocks_2_x_block_mlp_fc1"} <= modules
    assert not any("transformer_blocks" in m or "to_q" in m for m in modules)
    with safe_open(str(result.output), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-3-5-medium/")
    assert meta["ss_weighting_scheme"] == cfg.weighting_scheme


def x0_eval_loss(bundle, latents: torch.Tensor, prompt: str) -> float:
    """The x0 MSE at fixed σ and noise (never drawn in training), with whatever network is applied."""
    family = bundle.family
    gen = torch.Generator().manual_seed(99)
    noise = torch.randn(latents.shape, generator=gen)
    sigma = torch.linspace(0.2, 0.9, latents.shape[0])
    cond = encode_prompts(bundle, [prompt]).repeat(latents.shape[0])
    with torch.no_grad():
        noisy = family.noisy_input(None, latents, noise, sigma)
        pred = family.denoise(bundle, noisy, sigma, cond, None, device=torch.device("cpu"), dtype=torch.float32)
    return mse(pred, family.target(None, latents, noise, sigma, False))


def test_lora_on_sd3_learns_its_image(tmp_path, logs):
    data = tmp_path / "one"
    write_pair(data, target_suffix="_t")
    (data / "pair_t.png").unlink()
    (data / "pair.txt").write_text("a photo of a cat")
    cfg = sd3_job(tmp_path, "LoRA", lora_data_directory=str(data), train_iterations=60, train_learning_rate=5e-3,
                  train_batch_size=1)
    host = MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle())
    bundle = host.bundle
    SD3().prepare(bundle, cfg, torch.device("cpu"))
    latent = single_pair(cfg, bundle, device=torch.device("cpu"), orig_caption="", targ_caption="",
                         should_stop=lambda: False).origs.samples[0].latent[None].repeat(4, 1, 1, 1)
    before = x0_eval_loss(bundle, latent, "a photo of a cat")
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done"
    fresh = tiny_sd3_bundle()
    SD3().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output):
        after = x0_eval_loss(fresh, latent, "a photo of a cat")
    assert after < 0.85 * before, (before, after)


def ileco_gap(bundle, network=None) -> float:
    """‖x0_net(z, σ, "a cat") − x0_base(z, σ, "")‖² at held-out noise and σ."""
    family, cpu = bundle.family, torch.device("cpu")
    z = torch.randn((4, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    sigma = torch.linspace(0.1, 0.95, 4)
    conds = encode_prompts(bundle, ["a cat", ""])
    orig, targ = conds[0].repeat(4), conds[1].repeat(4)
    with torch.no_grad():
        if network is not None:
            with network.disabled():
                base = family.denoise(bundle, z, sigma, targ, None, device=cpu, dtype=torch.float32)
        else:
            base = family.denoise(bundle, z, sigma, targ, None, device=cpu, dtype=torch.float32)
        return mse(family.denoise(bundle, z, sigma, orig, None, device=cpu, dtype=torch.float32), base)


def test_ileco_erases_on_sd3_as_on_sd1(tmp_path, logs):
    cfg = sd3_job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", train_iterations=80,
                  train_learning_rate=4e-3)
    host = MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle())
    SD3().prepare(host.bundle, cfg, torch.device("cpu"))
    start = ileco_gap(host.bundle)
    result = Trainer(cfg, host, device="cpu").run()
    fresh = tiny_sd3_bundle()
    SD3().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        after = ileco_gap(fresh, net)
    assert after ** 0.5 < 0.5 * start ** 0.5, (start, after)


@pytest.mark.parametrize("over,key", [(dict(zero_terminal_snr=True), "zero_terminal_snr"),
                                      (dict(model_v_pred=True), "model_v_pred"),
                                      (dict(train_debiased_estimation=True), "train_debiased_estimation"),
                                      (dict(blocks_to_swap=1), "blocks_to_swap")])
def test_ddpm_and_flux_only_settings_are_refused(tmp_path, logs, over, key):
    host = MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle())
    with pytest.raises(ConfigError) as info:
        Trainer(sd3_job(tmp_path, "LoRA", **over), host, device="cpu").run()
    assert info.value.key == key


def test_resume_from_a_saved_state_matches_the_uninterrupted_sd3_run(tmp_path, logs):
    run = dict(train_iterations=6, save_state=True, train_lr_scheduler="cosine", train_batch_size=1)
    whole = Trainer(sd3_job(tmp_path, "LoRA", save_lora_name="whole", save_per_steps=3, **run),
                    MemoryHost(tmp_path / "a", bundle=tiny_sd3_bundle()), device="cpu").run()
    assert whole.status == "done" and (tmp_path / "a" / "whole_3steps-state").is_dir()
    resumed = Trainer(sd3_job(tmp_path, "LoRA", save_lora_name="resumed",
                              network_resume=str(tmp_path / "a" / "whole_3steps.safetensors"), **run),
                      MemoryHost(tmp_path / "b", bundle=tiny_sd3_bundle()), device="cpu").run()
    assert resumed.status == "done" and resumed.steps == 6
    a, b = load_file(str(whole.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("over,prefix", [
    (dict(), "lora_unet_joint_blocks_0_x_block_attn_qkv"),
    (dict(network_type="loha"), "lora_transformer_transformer_blocks_0_attn_to_q"),
])
def test_a_sd3_file_loads_back_into_the_same_network(tmp_path, logs, over, prefix):
    cfg = sd3_job(tmp_path, "LoRA", train_iterations=2, **over)
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle()), device="cpu").run()
    written = load_file(str(result.output))
    assert any(k.startswith(prefix + ".") for k in written), sorted(written)[:5]
    fresh = tiny_sd3_bundle()
    SD3().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)


@pytest.mark.parametrize("variant,arch", [("medium", "stable-diffusion-3-medium"), ("5-large", "stable-diffusion-3-5-large")])
def test_the_metadata_names_the_variant_as_sd_scripts_does(tmp_path, logs, variant, arch):
    result = Trainer(sd3_job(tmp_path, "LoRA", train_iterations=1),
                     MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle(variant)), device="cpu").run()
    with safe_open(str(result.output), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == variant and meta["modelspec.architecture"] == f"{arch}/lora"
    modules = {k.split(".")[0] for k in load_file(str(result.output))}
    assert not any("attn2" in m for m in modules)  # MMDiT-X's second attention is SD3.5 medium's only


def test_sd3_without_t5_trains_on_zero_tokens(tmp_path, logs):
    bundle = tiny_sd3_bundle(t5=False)
    cond = encode_prompts(bundle, ["a cat"])
    assert cond.hidden.shape[1] == 77 + 77 and not cond.hidden[:, 77:].any()
    result = Trainer(sd3_job(tmp_path, "LoRA", train_iterations=1), MemoryHost(tmp_path / "out", bundle=bundle),
                     device="cpu").run()
    assert result.status == "done"


@pytest.mark.parametrize("over,prefixes", [
    (dict(), {"lora_te1_", "lora_te2_"}),
    (dict(train_t5xxl=True, use_gradient_checkpointing=True), {"lora_te1_", "lora_te2_", "lora_te3_"}),
])
def test_text_encoders_train_with_base_under_sd_scripts_names(tmp_path, logs, over, prefixes):
    cfg = sd3_job(tmp_path, "LoRA", train_iterations=2, network_blocks=["BASE", "IN01"], **over)
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle()), device="cpu").run()
    assert result.status == "done"
    written = load_file(str(result.output))
    modules = {k.split(".")[0] for k in written}
    assert {m[:9] for m in modules if m.startswith("lora_te")} == prefixes
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= modules
    if "lora_te3_" in prefixes:
        assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in modules
    fresh = tiny_sd3_bundle()
    SD3().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)


def test_a_t5_lora_without_t5_is_refused_naming_the_key(tmp_path, logs):
    cfg = sd3_job(tmp_path, "LoRA", train_iterations=1, network_blocks=["BASE", "IN01"], train_t5xxl=True)
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_sd3_bundle(t5=False)), device="cpu").run()
    assert info.value.key == "train_t5xxl" and "no T5-XXL" in str(info.value)
