"""LoCon, LoHa and LoKr bypass forwards without their unit-scalar multiplies: the same values and gradients
as LyCORIS's own, with fewer elementwise multiplies per module and step (trainer/networks/fastpath.py)."""
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


def removed_muls(module) -> int:
    """Multiplies the lean forward leaves out, forward and backward: LyCORIS multiplies a LoCon's or a
    linear LoHa/LoKr's output by the unit scalar; a conv LoHa's weight and a conv LoKr's output also by
    the call's scale of 1."""
    if type(module).__name__ == "LoConModule" or module.module_type == "linear":
        return 2
    return 4


@pytest.mark.parametrize("ntype", ["lierla", "c3lier", "loha", "lokr"])
def test_lean_diff_gives_lycoris_values_with_fewer_multiplies(ntype):
    bundle = tiny_bundle("sd1", seed=0)
    net = Network.build(bundle, make_cfg(network_type=ntype), train_text_encoder=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # lora_up / w1 start at 0: make the delta count
    modules = net.unet_modules
    assert modules and all("bypass_forward_diff" in m.__dict__ for m in modules)
    if ntype != "lierla":
        assert any(m.module_type.startswith("conv") for m in modules)  # both paths are covered
    fast_out, fast_grads, fast_muls = step(bundle, net)
    for m in modules:
        del m.__dict__["bypass_forward_diff"]  # back to LyCORIS's own method
    out, grads, muls = step(bundle, net)
    assert torch.equal(fast_out, out)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, grads))
    assert muls - fast_muls == sum(removed_muls(m) for m in modules)


def test_modules_that_need_the_scalar_keep_lycoris_forward():
    bundle = tiny_bundle("sd1", seed=0)
    for kw in ({"network_type": "lierla", "network_dora": True}, {"network_type": "c3lier", "network_dora": True}):
        net = Network.build(bundle, make_cfg(**kw), train_text_encoder=False)
        assert net.unet_modules
        assert not any("bypass_forward_diff" in m.__dict__ for m in net.unet_modules), kw
        net.remove()
