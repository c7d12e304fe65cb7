"""Per-block learning-rate weights and ranks (TrainTrain block IDs), DoRA training and saving."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import TE_HIDDEN, tiny_bundle
from trainer.networks.blockctl import lr_weights
from trainer.families.blocks import block_id
from trainer.config.schema import TrainConfig
from trainer.networks.network import Network
from trainer.training.optim import build_optimizer
from trainer.config.params import ConfigError

LR = 1e-3


def cfg_of(**kw) -> TrainConfig:
    base = dict(network_rank=4, network_alpha=2.0, save_lora_name="t", train_learning_rate=LR,
                network_blocks=[b for b in TrainConfig().network_blocks if b != "BASE"])
    base.update(kw)
    return TrainConfig(**base).validate()


def module_blocks(bundle, net: Network) -> dict[int, str]:
    """id(network module) -> block ID of the U-Net layer it wraps, found by identity in the model."""
    path_of = {id(m): name for name, m in bundle.unet.named_modules()}
    return {id(m): block_id(bundle.family, path_of[id(m.org_module[0])]) for m in net.unet_modules}


def lr_by_param(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("family,weights", [
    ("sd1", {"IN01": 0.5, "M00": 2.0, "OUT11": 0.0, "OUT03": 0.25}),
    ("sdxl", {"IN04": 0.5, "M00": 2.0, "OUT08": 0.0, "OUT02": 0.25}),
])
def test_group_rates_follow_the_block_weights(family: str, weights: dict[str, float]) -> None:
    bundle = tiny_bundle(family)
    text = ", ".join(f"{k}={v}" for k, v in weights.items())
    net = Network.build(bundle, cfg_of(network_type="c3lier", network_block_lr_weights=text))
    groups = net.param_groups(LR, LR)
    rates, blocks = lr_by_param(groups), module_blocks(bundle, net)
    assert set(blocks.values()) >= set(weights)  # every named block has layers here
    for m in net.unet_modules:
        want = LR * weights.get(blocks[id(m)], 1.0)
        for p in m.parameters():
            assert rates.get(id(p), 0.0) == pytest.approx(want), (m.lora_name, blocks[id(m)])
    zero = [b for b, w in weights.items() if w == 0]
    names = {g["name"] for g in groups}
    assert names == {"unet"} | {f"unet_{b}" for b, w in weights.items() if w not in (0, 1)}
    assert not any(f"unet_{b}" in names for b in zero)


def test_zero_weight_block_is_frozen_and_unchanged_after_steps() -> None:
    bundle = tiny_bundle("sd1")
    net = Network.build(bundle, cfg_of(network_block_lr_weights="OUT11=0, IN01=0"))
    blocks = module_blocks(bundle, net)
    frozen = [p for m in net.unet_modules if blocks[id(m)] in ("OUT11", "IN01") for p in m.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    opt = build_optimizer("AdamW", net.param_groups(LR, LR), LR, "weight_decay=0.1")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in frozen}
    before = [p.detach().clone() for p in frozen]
    trained = [p for g in opt.param_groups for p in g["params"]]
    trained_before = [p.detach().clone() for p in trained]
    for step in range(3):
        torch.manual_seed(step)
        out = bundle.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, TE_HIDDEN)).sample
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    assert any(not torch.equal(a, p) for a, p in zip(trained_before, trained))
    everything = {id(p) for g in net.param_groups(0.0, 0.0) for p in g["params"]}
    assert everything == {id(p) for p in net.parameters()}


def test_hierarchical_form_presets_and_per_id_override() -> None:
    cfg = cfg_of(down_lr_weight="sine+0.5", mid_lr_weight="0.25", up_lr_weight="reverse_linear",
                 network_block_lr_weights="OUT00=3")
    w = lr_weights(cfg)
    assert [w[f"IN{i:02d}"] for i in range(12)] == pytest.approx(
        [math.sin(math.pi * i / 11 / 2) + 0.5 for i in range(12)])
    assert w["M00"] == 0.25
    assert w["OUT00"] == 3.0 and [w[f"OUT{i:02d}"] for i in range(1, 12)] == pytest.approx(
        [(11 - i) / 11 for i in range(1, 12)])
    w = lr_weights(cfg_of(down_lr_weight=",".join(["0.5"] * 12), up_lr_weight="zeros+0.1"))
    assert w["IN07"] == 0.5 and w["OUT05"] == pytest.approx(0.1) and "M00" not in w
    cos = lr_weights(cfg_of(up_lr_weight="cosine"))
    assert cos["OUT00"] == pytest.approx(1.0) and cos["OUT11"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("field,value,needle", [
    ("network_block_lr_weights", "IN12=0.5", "unknown block ID"),
    ("network_block_lr_weights", "XX=1", "unknown block ID"),
    ("network_block_lr_weights", "IN01=abc", "not a number"),
    ("network_block_lr_weights", "IN01=-1", "from 0"),
    ("network_block_lr_weights", "IN01=nan", "from 0"),
    ("network_block_lr_weights", "IN01", "BLOCK=value"),
    ("network_block_lr_weights", "IN01=1, in01=2", "twice"),
    ("down_lr_weight", "1,1,1", "expected 12"),
    ("down_lr_weight", ",".join(["1"] * 13), "expected 12"),
    ("up_lr_weight", "sine+x", "not a number"),
    ("up_lr_weight", "wave", "not a number"),
    ("mid_lr_weight", "1,2", "expected 1"),
    ("network_block_dims", "IN04=0", "whole number"),
    ("network_block_dims", "IN04=8.5", "whole number"),
    ("network_block_dims", "OUT12=8", "unknown block ID"),
    ("network_block_dims", "IN04=4096", "whole number"),
])
def test_bad_block_settings_name_field_and_value(field: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_of(**{field: value})
    assert err.value.key == field and needle in err.value.problem
    assert str(err.value.value) in value or value.split(",")[0].strip() in str(err.value.value)


@pytest.mark.parametrize("family,dims", [("sd1", {"IN04": 8, "OUT11": 2, "BASE": 6}),
                                         ("sdxl", {"IN04": 8, "OUT08": 2, "M00": 6})])
def test_block_ranks_in_network_and_file_and_resume(tmp_path, family: str, dims: dict[str, int]) -> None:
    bundle = tiny_bundle(family)
    text = ", ".join(f"{k}={v}" for k, v in dims.items())
    cfg = cfg_of(network_type="c3lier", network_block_dims=text, network_blocks=list(TrainConfig().network_blocks),
                 network_conv_rank=4, network_conv_alpha=1.0)
    net = Network.build(bundle, cfg)
    blocks = module_blocks(bundle, net)
    assert set(blocks.values()) >= set(dims) - {"BASE"}
    expect = {}
    for m in net.unet_modules:
        dim = dims.get(blocks[id(m)], 4)
        conv3 = isinstance(m.org_module[0], torch.nn.Conv2d) and m.org_module[0].kernel_size != (1, 1)
        alpha = (1.0 if conv3 else 2.0) * dim / 4  # alpha keeps the alpha/rank ratio
        expect[m.lora_name] = (dim, alpha)
    for m in net.text_encoder_modules:
        expect[m.lora_name] = (dims.get("BASE", 4), 2.0 * dims.get("BASE", 4) / 4)
    for m in net.unet_modules + net.text_encoder_modules:
        assert m.lora_down.weight.shape[0] == expect[m.lora_name][0] == m.lora_up.weight.shape[1]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = net.save(tmp_path / "b.safetensors", dtype=torch.float32, metadata={})
    sd = load_file(str(path))
    in_file = {net.file_names.get(n, n): v for n, v in expect.items()}  # SDXL: checkpoint-layout names
    assert {k.split(".")[0] for k in sd} == set(in_file)
    for name, (dim, alpha) in in_file.items():
        assert sd[f"{name}.lora_down.weight"].shape[0] == dim == sd[f"{name}.lora_up.weight"].shape[1]
        assert sd[f"{name}.alpha"].item() == pytest.approx(alpha)
    x = (torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 2 * TE_HIDDEN if family == "sdxl" else TE_HIDDEN))
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, TE_HIDDEN), "time_ids": torch.randn(1, 6)}} \
        if family == "sdxl" else {}
    with torch.no_grad():
        trained = bundle.unet(*x, **kw).sample
    net.remove()
    again = Network.build(bundle, cfg)
    again.load_weights(path)
    with torch.no_grad():
        assert torch.allclose(bundle.unet(*x, **kw).sample, trained, atol=1e-6)
    again.remove()
    other = Network.build(bundle, cfg_of(network_type="c3lier", network_blocks=list(TrainConfig().network_blocks),
                                         network_conv_rank=4, network_conv_alpha=1.0))
    with pytest.raises(ConfigError) as err:
        other.load_weights(path)
    assert err.value.key == "network_resume" and ("shape" in err.value.problem or "alpha" in err.value.problem)


def test_dora_trains_and_saves(tmp_path) -> None:
    bundle = tiny_bundle("sd1")
    net = Network.build(bundle, cfg_of(network_dora=True, network_block_lr_weights="OUT11=0.5"))
    opt = build_optimizer("AdamW", net.param_groups(1e-2, 1e-2), 1e-2, "")
    first = None
    for step in range(4):
        torch.manual_seed(0)
        out = bundle.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, TE_HIDDEN)).sample
        loss = out.pow(2).mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < first
    path = net.save(tmp_path / "d.safetensors", dtype=torch.float32, metadata={})
    sd = load_file(str(path))
    scales = [k for k in sd if k.endswith(".dora_scale")]
    assert scales and len(scales) == len(net.unet_modules)
    assert any(sd[k.replace("dora_scale", "lora_up.weight")].abs().sum() > 0 for k in scales)
