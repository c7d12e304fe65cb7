"""The LoCon bypass forward without its unit-scalar multiply: the same values and gradients as
LyCORIS's own, two elementwise multiplies fewer per module and step (trainer/networks/build.py skip_unit_scalar)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.networks.network import Network


def make_cfg(**kw) -> TrainConfig:
    base = dict(mode="LoRA", network_rank=4, network_alpha=2.0, train_model_precision="fp32",
                train_lora_precision="fp32", train_iterations=10)
    base.update(kw)
    return TrainConfig(**base)


def step(bundle, net: Network) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One U-Net forward and backward: output, the network's gradients, aten::mul calls."""
    torch.manual_seed(3)
    sample = torch.randn(1, 4, 8, 8)
    cond = torch.randn(1, 77, bundle.unet.config.cross_attention_dim)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = bundle.unet(sample, torch.tensor([500]), encoder_hidden_states=cond).sample
        out.square().mean().backward()
    muls = sum(e.count for e in prof.key_averages() if e.key == "aten::mul")
    grads = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    return out.detach(), grads, muls


@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_plain_diff_gives_lycoris_values_with_two_multiplies_fewer_per_module(ntype):
    bundle = tiny_bundle("sd1", seed=0)
    net = Network.build(bundle, make_cfg(network_type=ntype), train_text_encoder=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # lora_up starts at 0: make the delta count
    modules = net.unet_modules
    assert modules and all("bypass_forward_diff" in m.__dict__ for m in modules)
    fast_out, fast_grads, fast_muls = step(bundle, net)
    for m in modules:
        del m.__dict__["bypass_forward_diff"]  # back to LyCORIS's own method
    out, grads, muls = step(bundle, net)
    assert torch.equal(fast_out, out)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, grads))
    assert muls - fast_muls == 2 * len(modules)  # the forward multiply and the one in its backward


def test_modules_that_need_the_scalar_keep_lycoris_forward():
    bundle = tiny_bundle("sd1", seed=0)
    dora = Network.build(bundle, make_cfg(network_type="lierla", network_dora=True), train_text_encoder=False)
    assert not any("bypass_forward_diff" in m.__dict__ for m in dora.unet_modules)
    dora.remove()
    loha = Network.build(bundle, make_cfg(network_type="loha"), train_text_encoder=False)
    assert not any("bypass_forward_diff" in m.__dict__ for m in loha.unet_modules)
