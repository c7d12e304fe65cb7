"""FLUX.1's network settings, named as sd-scripts' networks/lora_flux.py names them: block lists,
per-layer ranks (type_dims), split_qkv, and the T5-XXL LoRA with its own learning rate."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config.params import BLOCK_IDS, ConfigError
from trainer.families.flux_net import layer_kind
from trainer.networks.network import Network
from trainer.training.engine import Trainer

from tests.enginekit import MemoryHost
from tests.flux_tiny import tiny_flux_bundle
from tests.modekit import loaded
from tests.test_flux_family import flux_job

UNET_ONLY = [b for b in BLOCK_IDS if b != "BASE"]


def modules_of(path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        module, _, tensor = key.partition(".")
        out.setdefault(module, {})[tensor] = value
    return out


def delta(group: dict[str, torch.Tensor]) -> torch.Tensor:
    """A plain LoRA's weight delta as every consumer computes it: up @ down * alpha / rank."""
    down, up = group["lora_down.weight"].float(), group["lora_up.weight"].float()
    return up @ down * float(group["alpha"]) / down.shape[0]


def memory_delta(net: Network, name: str) -> torch.Tensor:
    module = next(m for m in net.lyco.loras if m.lora_name == name)
    return module.lora_up.weight.float() @ module.lora_down.weight.float() * float(module.scale)


def test_block_lists_choose_the_blocks_as_sd_scripts_writes_them(tmp_path, logs):
    cfg = flux_job(tmp_path, "LoRA", train_iterations=1, train_double_block_indices="1",
                   train_single_block_indices="none")
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle()), device="cpu").run()
    modules = {k.split(".")[0] for k in load_file(str(result.output)) if k.startswith("lora_unet_")}
    assert modules and all(m.startswith("lora_unet_double_blocks_1_") for m in modules), sorted(modules)
    with pytest.raises(ConfigError) as info:
        flux_job(tmp_path, "LoRA", train_single_block_indices="3-1").validate()
    assert info.value.key == "train_single_block_indices" and "backwards" in str(info.value)
    with pytest.raises(ConfigError) as info:
        flux_job(tmp_path, "LoRA", train_double_block_indices="first").validate()
    assert info.value.key == "train_double_block_indices"


def test_every_layer_in_a_block_has_the_kind_sd_scripts_gives_it():
    kinds = {}
    for name, module in tiny_flux_bundle().unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[0].endswith("transformer_blocks"):
            kinds[name.split(".", 2)[2] + ("@single" if name.startswith("single") else "")] = layer_kind(name)
    assert kinds == {
        "norm1.linear": "img_mod_dim", "norm1_context.linear": "txt_mod_dim",
        "attn.to_q": "img_attn_dim", "attn.to_k": "img_attn_dim", "attn.to_v": "img_attn_dim",
        "attn.to_out.0": "img_attn_dim", "attn.add_q_proj": "txt_attn_dim", "attn.add_k_proj": "txt_attn_dim",
        "attn.add_v_proj": "txt_attn_dim", "attn.to_add_out": "txt_attn_dim",
        "ff.net.0.proj": "img_mlp_dim", "ff.net.2": "img_mlp_dim",
        "ff_context.net.0.proj": "txt_mlp_dim", "ff_context.net.2": "txt_mlp_dim",
        "norm.linear@single": "single_mod_dim", "proj_mlp@single": "single_dim", "proj_out@single": "single_dim",
        "attn.to_q@single": "single_dim", "attn.to_k@single": "single_dim", "attn.to_v@single": "single_dim",
    }


def test_layer_ranks_shape_the_file_as_sd_scripts_type_dims(tmp_path, logs):
    """img_attn_dim 2, txt_mlp_dim 8, single_mod_dim 0 over rank 4: each layer has its rank, alpha
    stays network_alpha, the skipped layers have no keys, and the file loads back."""
    cfg = flux_job(tmp_path, "LoRA", train_iterations=2, network_blocks=UNET_ONLY, img_attn_dim=2,
                   txt_mlp_dim=8, single_mod_dim=0)
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle()), device="cpu").run()
    assert result.status == "done"
    groups = modules_of(result.output)
    ranks = {m: g["lora_down.weight"].shape[0] for m, g in groups.items()}
    for i in (0, 1):
        assert ranks[f"lora_unet_double_blocks_{i}_img_attn_qkv"] == 2  # q/k/v share one down of rank 2
        assert ranks[f"lora_unet_double_blocks_{i}_img_attn_proj"] == 2
        assert ranks[f"lora_unet_double_blocks_{i}_txt_mlp_0"] == ranks[f"lora_unet_double_blocks_{i}_txt_mlp_2"] == 8
        assert ranks[f"lora_unet_double_blocks_{i}_txt_attn_qkv"] == 4
        assert ranks[f"lora_unet_double_blocks_{i}_img_mod_lin"] == 4
        assert ranks[f"lora_unet_single_blocks_{i}_linear1"] == ranks[f"lora_unet_single_blocks_{i}_linear2"] == 4
        assert f"lora_unet_single_blocks_{i}_modulation_lin" not in groups
    assert {float(g["alpha"]) for g in groups.values()} == {4.0}
    with safe_open(str(result.output), "pt") as fh:
        args = json.loads(fh.metadata()["ss_network_args"])
    assert {k: args[k] for k in ("img_attn_dim", "txt_mlp_dim", "single_mod_dim", "split_qkv")} == {
        "img_attn_dim": "2", "txt_mlp_dim": "8", "single_mod_dim": "0", "split_qkv": "False"}
    assert "txt_attn_dim" not in args and "train_double_block_indices" not in args
    fresh = tiny_flux_bundle()
    with loaded(fresh, cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    written = load_file(str(result.output))
    assert set(again) == set(written) and all(torch.equal(again[k], written[k]) for k in written)


@pytest.mark.parametrize("split", [False, True])
def test_split_qkv_as_sd_scripts_and_the_file_applies_as_trained(tmp_path, logs, split):
    """Off (sd-scripts' default): q, k, v (and the single blocks' MLP input) share one down, and the
    file is one rank-r LoRA per fused layer. On: one LoRA each, stacked. Either way each part's
    rows of the file's delta equal the trained delta of that part."""
    cfg = flux_job(tmp_path, "LoRA", train_iterations=3, network_blocks=UNET_ONLY, split_qkv=split,
                   network_rank=4, network_alpha=2.0)
    bundle = tiny_flux_bundle()
    host = MemoryHost(tmp_path / "out", bundle=bundle)
    result = Trainer(cfg, host, device="cpu").run()
    groups = modules_of(result.output)
    qkv, linear1 = groups["lora_unet_double_blocks_0_img_attn_qkv"], groups["lora_unet_single_blocks_1_linear1"]
    assert qkv["lora_down.weight"].shape[0] == (12 if split else 4)
    assert linear1["lora_down.weight"].shape[0] == (16 if split else 4)
    assert float(qkv["alpha"]) == (6.0 if split else 2.0)  # scale alpha/rank kept at 0.5 either way
    with loaded(tiny_flux_bundle(), cfg, result.output) as (net,):
        downs = {id(m.lora_down.weight) for m in net.lyco.loras if "transformer_blocks_0_attn_to_" in m.lora_name
                 and m.lora_name.endswith(("to_q", "to_k", "to_v")) and "single" not in m.lora_name}
        assert len(downs) == (3 if split else 1)
        width = qkv["lora_up.weight"].shape[0] // 3
        file_delta = delta(qkv)
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            mine = memory_delta(net, f"lora_unet_transformer_blocks_0_attn_{part}")
            assert torch.allclose(file_delta[j * width:(j + 1) * width], mine, atol=1e-6), part
        assert float(file_delta.abs().max()) > 0  # training moved the ups
        n_params = net.n_params
    per_part = 4 * 64  # one rank-4 down over the 64-wide hidden state
    # sharing saves two downs per qkv (two per double block, two blocks), three per linear1 (two blocks)
    shared_saving = (2 * 2 * 2 + 2 * 3) * per_part
    other = Network.build(tiny_flux_bundle(), flux_job(tmp_path, "LoRA", network_blocks=UNET_ONLY,
                                                       split_qkv=not split, network_rank=4))
    try:
        assert abs(other.n_params - n_params) == shared_saving
    finally:
        other.remove()


def test_t5_lora_trains_at_its_own_rate_and_is_written_as_lora_te3(tmp_path, logs):
    cfg = flux_job(tmp_path, "LoRA", train_iterations=3, train_t5xxl=True, t5xxl_learning_rate=3e-3,
                   network_blocks=list(BLOCK_IDS), train_textencoder_learning_rate=1e-3, train_learning_rate=1e-3)
    bundle = tiny_flux_bundle()
    network = Network.build(bundle, cfg)
    try:
        groups = {g["name"]: g for g in network.param_groups(cfg.train_learning_rate, cfg.text_encoder_lr)}
        t5_params = {id(p) for m in network.text_encoder_modules if m.lora_name.startswith("lora_te2_")
                     for p in m.parameters()}
        assert t5_params and {id(p) for p in groups["text_encoder_te2"]["params"]} == t5_params
        assert groups["text_encoder_te2"]["lr"] == 3e-3 and groups["text_encoder"]["lr"] == 1e-3
        frozen = {g["name"]: g["lr"] for g in network.param_groups(0.0, 0.0)}
        assert frozen["text_encoder_te2"] == 0.0  # a frozen pass freezes T5's LoRA too
    finally:
        network.remove()
    result = Trainer(cfg, MemoryHost(tmp_path / "out", bundle=bundle), device="cpu").run()
    assert result.status == "done"
    written = modules_of(result.output)
    t5_modules = {m for m in written if m.startswith("lora_te3_")}
    t5 = bundle.text_encoders[1]
    expected = {"lora_te3_" + name.replace(".", "_") for name, module in t5.named_modules()
                if isinstance(module, torch.nn.Linear) and (".SelfAttention." in name or ".DenseReluDense." in name)}
    assert t5_modules == expected and len(expected) == 2 * 7  # q k v o wi_0 wi_1 wo per layer
    assert any(m.startswith("lora_te1_text_model_") for m in written)
    assert all(float(written[m]["lora_up.weight"].abs().max()) > 0 for m in t5_modules)  # it trained
    with loaded(tiny_flux_bundle(), cfg, result.output) as (net,):
        again = net.state_dict_kohya()
    flat = load_file(str(result.output))
    assert set(again) == set(flat) and all(torch.equal(again[k], flat[k]) for k in flat)


def test_t5_lora_needs_text_encoder_training(tmp_path, logs):
    host = MemoryHost(tmp_path / "out", bundle=tiny_flux_bundle())
    with pytest.raises(ConfigError) as info:
        Trainer(flux_job(tmp_path, "LoRA", train_iterations=1, train_t5xxl=True, network_blocks=UNET_ONLY),
                host, device="cpu").run()
    assert info.value.key == "train_t5xxl" and "BASE" in str(info.value)
