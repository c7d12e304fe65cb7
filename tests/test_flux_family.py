"""FLUX.1 through the one engine: every mode trains a tiny FLUX, the loss falls, iLECO erases, files
hold sd-scripts' BFL keys and FLUX metadata, and a file loads back into the same network."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config.params import ConfigError
from trainer.data.pairs import single_pair
from trainer.families import detect_family, get_family
from trainer.families.flux import Flux, image_ids, pack, unpack
from trainer.families.textenc import encode_prompts
from trainer.training.engine import Trainer

from tests.enginekit import MemoryHost
from tests.flux_tiny import diffusers_to_bfl, tiny_flux_bundle
from tests.modekit import loaded, mode_job, mse, write_pair

FAST = dict(t5xxl_max_token_length=16, train_snr_gamma=0.0)  # 16 T5 tokens keep the CPU steps short


def flux_job(tmp_path, mode: str, **over):
    orig, targ = write_pair(tmp_path / "pair", target_suffix="_t")
    base = dict(FAST, original_prompt="a photo of a cat", target_prompt="a photo of a dog",
                diff_original_image=str(orig), diff_target_image=str(targ),
                lora_data_directory=str(tmp_path / "pair"), diff_target_name="_t")
    base.update(over)
    return mode_job(tmp_path, mode, **base)


def test_flux_is_told_apart_from_the_sd_families():
    bundle = tiny_flux_bundle()
    diffusers_sd = bundle.unet.state_dict()
    assert detect_family(diffusers_sd) is get_family("flux")
    assert detect_family(diffusers_to_bfl(diffusers_sd)) is get_family("flux")
    assert detect_family({f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(diffusers_sd).items()}).name == "flux"


def test_packing_round_trips_and_ids_follow_rows_and_columns():
    z = torch.randn(2, 16, 6, 8)
    tokens = pack(z)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(unpack(tokens, 6, 8), z)
    # token (row 1, column 2) holds the 2x2 patch at latent rows 2-3, columns 4-5, channel-major
    assert torch.equal(tokens[0, 1 * 4 + 2].view(16, 2, 2), z[0, :, 2:4, 4:6])
    ids = image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("mode", ["LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_trains_flux_and_writes_sd_scripts_keys(tmp_path, logs, mode):
    cfg = flux_job(tmp_path, mode, train_iterations=2)
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 2 and result.output.is_file()
    assert math.isfinite(result.loss_first) and math.isfinite(result.loss_last)
    keys = set(load_file(str(result.output)))
    modules = {k.split(".")[0] for k in keys}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_single_blocks_1_linear1",
            "lora_unet_single_blocks_0_linear2"} <= modules
    assert not any("transformer_blocks" in m or "to_q" in m for m in modules)
    with safe_open(str(result.output), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"].startswith("flux-1-dev/")
    assert meta["ss_timestep_sampling"] == cfg.timestep_sampling


def flow_eval_loss(bundle, latents: torch.Tensor, prompt: str) -> float:
    """The velocity MSE at fixed σ and noise (never drawn in training), with whatever network is applied."""
    family = bundle.family
    gen = torch.Generator().manual_seed(99)
    noise = torch.randn(latents.shape, generator=gen)
    sigma = torch.linspace(0.2, 0.9, latents.shape[0])
    cond = encode_prompts(bundle, [prompt]).repeat(latents.shape[0])
    with torch.no_grad():
        noisy = family.noisy_input(None, latents, noise, sigma)
        pred = family.denoise(bundle, noisy, sigma, cond, None, device=torch.device("cpu"), dtype=torch.float32)
    return mse(pred, family.target(None, latents, noise, sigma, False))


def test_lora_on_flux_learns_its_image(tmp_path, logs):
    data = tmp_path / "one"
    orig, _ = write_pair(data, target_suffix="_t")
    (data / "pair_t.png").unlink()
    (data / "pair.txt").write_text("a photo of a cat")
    cfg = flux_job(tmp_path, "LoRA", lora_data_directory=str(data), train_iterations=60, train_learning_rate=5e-3,
                   train_batch_size=1, model_prediction_type="raw", timestep_sampling="uniform")
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    bundle = host.bundle
    Flux().prepare(bundle, cfg, torch.device("cpu"))
    latent = single_pair(cfg, bundle, device=torch.device("cpu"), orig_caption="", targ_caption="",
                         should_stop=lambda: False).origs.samples[0].latent[None].repeat(4, 1, 1, 1)
    before = flow_eval_loss(bundle, latent, "a photo of a cat")
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done"
    fresh = tiny_flux_bundle()
    Flux().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output):
        after = flow_eval_loss(fresh, latent, "a photo of a cat")
    assert after < 0.85 * before, (before, after)  # measured: 1.35 -> 1.03


def ileco_gap(bundle, network=None) -> float:
    """‖v_net(z, σ, "a cat") − v_base(z, σ, "")‖² at held-out noise and σ."""
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


def test_ileco_erases_on_flux_as_on_sd1(tmp_path, logs):
    cfg = flux_job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", train_iterations=40,
                   train_learning_rate=2e-3, model_prediction_type="raw")
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    Flux().prepare(host.bundle, cfg, torch.device("cpu"))
    start = ileco_gap(host.bundle)
    result = Trainer(cfg, host, device="cpu").run()
    fresh = tiny_flux_bundle()
    Flux().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        after = ileco_gap(fresh, net)
    assert after ** 0.5 < 0.5 * start ** 0.5, (start, after)


def test_a_flux_file_loads_back_into_the_same_network(tmp_path, logs):
    cfg = flux_job(tmp_path, "LoRA", train_iterations=3)
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    result = Trainer(cfg, host, device="cpu").run()
    written = load_file(str(result.output))
    fresh = tiny_flux_bundle()
    Flux().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    assert set(again) == set(written)
    for key, value in written.items():
        assert torch.equal(again[key], value), key


def test_ddpm_only_settings_are_refused_or_left_out_with_a_message(tmp_path, logs):
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    with pytest.raises(ConfigError) as info:
        Trainer(flux_job(tmp_path, "LoRA", zero_terminal_snr=True), host, device="cpu").run()
    assert info.value.key == "zero_terminal_snr" and "flow schedule" in str(info.value)
    result = Trainer(flux_job(tmp_path, "LoRA", train_iterations=1, train_snr_gamma=5.0), host, device="cpu").run()
    assert result.status == "done"
    assert any("train_snr_gamma 5" in (e.message or "") for e in host.events)
    assert "train_snr_gamma 5" in result.message  # the final message keeps it


def test_file_family_reads_only_the_header(tmp_path):
    from safetensors.torch import save_file

    from trainer.families import file_family

    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(tiny_flux_bundle().unet.state_dict()).items()}
    save_file(bfl, str(tmp_path / "flux1-dev.safetensors"))
    assert file_family(tmp_path / "flux1-dev.safetensors") == "flux"
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert file_family(tmp_path / "other.safetensors") is None
    assert file_family(tmp_path / "missing.safetensors") is None
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert file_family(tmp_path / "folder") == "flux"


def test_block_swap_trains_the_same_network_as_without(tmp_path, logs):
    """On the CPU the moves are no-ops, so the swapped run must equal the plain one exactly."""
    files = []
    for swap in (0, 2):
        cfg = flux_job(tmp_path, "LoRA", train_iterations=3, blocks_to_swap=swap, save_lora_name=f"swap{swap}",
                       network_blocks=["IN01"])  # no BASE: the text encoder does not train
        host = MemoryHost(tmp_path / f"out{swap}", bundle=tiny_flux_bundle())
        result = Trainer(cfg, host, device="cpu").run()
        assert result.status == "done"
        assert "block_swap" not in host.bundle.extra  # unhooked after the pass
        files.append(load_file(str(result.output)))
    assert set(files[0]) == set(files[1])
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


@pytest.mark.parametrize("over,key", [
    (dict(fp8_base=True), "fp8_base"),
    (dict(blocks_to_swap=2, network_blocks=["BASE", "IN01"]), "blocks_to_swap"),  # the text encoder trains
    (dict(blocks_to_swap=3), "blocks_to_swap"),  # 4 blocks: two must stay on the device
])
def test_memory_options_are_refused_where_they_cannot_work(tmp_path, logs, over, key):
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    with pytest.raises(ConfigError) as info:
        Trainer(flux_job(tmp_path, "LoRA", train_iterations=1, **over), host, device="cpu").run()
    assert info.value.key == key
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resume_from_a_saved_state_matches_the_uninterrupted_flux_run(tmp_path, logs):
    """save_state at step 3 of 6, then network_resume of that file: the same final file as one run."""
    run = dict(train_iterations=6, save_state=True, train_lr_scheduler="cosine", train_batch_size=1)
    whole = Trainer(flux_job(tmp_path, "LoRA", save_lora_name="whole", save_per_steps=3, **run),
                    MemoryHost(tmp_path / "a", bundle=tiny_flux_bundle()), device="cpu").run()
    assert whole.status == "done" and (tmp_path / "a" / "whole_3steps-state").is_dir()
    resumed = Trainer(flux_job(tmp_path, "LoRA", save_lora_name="resumed",
                               network_resume=str(tmp_path / "a" / "whole_3steps.safetensors"), **run),
                      MemoryHost(tmp_path / "b", bundle=tiny_flux_bundle()), device="cpu").run()
    assert resumed.status == "done" and resumed.steps == 6
    a, b = load_file(str(whole.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("over,prefix", [
    (dict(network_type="c3lier"), "lora_unet_double_blocks_0_img_attn_qkv"),  # Linear layers only: plain LoRA
    (dict(network_type="loha"), "lora_transformer_transformer_blocks_0_attn_to_q"),
    (dict(network_type="lokr"), "lora_transformer_transformer_blocks_0_attn_to_q"),
    (dict(network_type="lierla", network_dora=True), "lora_transformer_transformer_blocks_0_attn_to_q"),
])
def test_every_network_type_trains_flux_and_loads_back(tmp_path, logs, over, prefix):
    cfg = flux_job(tmp_path, "LoRA", train_iterations=2, **over)
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle()), device="cpu").run()
    assert result.status == "done"
    written = load_file(str(result.output))
    assert any(k.startswith(prefix + ".") for k in written), sorted(written)[:5]
    fresh = tiny_flux_bundle()
    Flux().prepare(fresh, cfg, torch.device("cpu"))
    with loaded(fresh, cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)

