"""fp8_base: float8 storage of the frozen Linear weights, upcast in the forward and the backward.

The feature is refused on the CPU (check_fp8), but float8 tensors exist there, so the
mechanics are tested on the CPU by calling apply_fp8_base directly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_blockswap import FakeBoundary, inputs, lycoris, tiny_flux
from trainer.config.params import ConfigError
from trainer.training import fp8
from trainer.training.blockswap import enable_block_swap, flux_blocks
from trainer.training.fp8 import Fp8BaseLinear, apply_fp8_base, check_fp8, fp8_layers, remove_fp8_base

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def rounded_copy(model: nn.Module) -> nn.Module:
    """The bf16 model whose Linear weights went through float8 and back: what fp8_base computes with."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if type(m) is nn.Linear:
                m.weight.copy_(m.weight.to(FP8).to(BF16))
    return ref


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4, bias=False)).to(BF16).requires_grad_(False)


def test_cpu_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        check_fp8("cpu")
    assert "fp8_base" in str(err.value) and "needs an accelerator" in str(err.value)
    assert "CPU" in str(err.value)


def test_an_accelerator_without_float8_is_refused(monkeypatch):
    def refuse(device):  # what MPS answers for float8 tensors
        raise TypeError("Trying to convert Float8_e4m3fn to the MPS backend but it does not have support for that dtype.")
    monkeypatch.setattr(fp8, "_float8_roundtrip", refuse)
    with pytest.raises(ConfigError) as err:
        check_fp8("mps")
    assert "fp8_base" in str(err.value) and "mps cannot store float8_e4m3fn" in str(err.value)
    assert "does not have support" in str(err.value)
    monkeypatch.setattr(fp8, "_float8_roundtrip", lambda device: False)
    with pytest.raises(ConfigError, match="does not read float8_e4m3fn weights back correctly"):
        check_fp8("cuda")
    monkeypatch.setattr(fp8, "_float8_roundtrip", lambda device: True)
    check_fp8("cuda")  # a capable accelerator passes
    with pytest.raises(ConfigError, match="fp8_base.*DoRA"):
        check_fp8("cuda", dora=True)
    with pytest.raises(ConfigError, match="fp8_base.*unknown device 'warp9'"):
        check_fp8("warp9")


def test_the_probe_round_trips_on_the_cpu():
    assert fp8._float8_roundtrip(torch.device("cpu")) is True


def test_storage_and_forward_upcast():
    model = mlp()
    ref = rounded_copy(model)
    assert apply_fp8_base(model, BF16) == 2 and fp8_layers(model) == 2
    assert [type(m) for m in model] == [Fp8BaseLinear, nn.GELU, nn.LayerNorm, Fp8BaseLinear]
    assert model[0].weight.dtype == FP8 and model[3].weight.dtype == FP8 and model[0].bias.dtype == BF16
    assert model[2].weight.dtype == BF16  # norms untouched
    assert set(model.state_dict()) == set(ref.state_dict())  # same keys: same Parameters, new dtype
    x = torch.randn(3, 5, 6).to(BF16)
    assert torch.equal(model(x), ref(x))
    direct = F.linear(x, model[0].weight.to(BF16), model[0].bias)
    assert torch.equal(model[0](x), direct)
    # the upcast is exact: bf16 holds every float8_e4m3fn value
    w = model[0].weight
    assert torch.equal(w.to(BF16).to(FP8).view(torch.uint8), w.view(torch.uint8))


def test_input_gradient_flows_through_the_frozen_fp8_layer():
    model = mlp()
    ref = rounded_copy(model)
    apply_fp8_base(model, BF16)
    x = torch.randn(4, 6, dtype=BF16, requires_grad=True)
    model(x).float().square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    ref.requires_grad_(False)
    ref(x).float().square().sum().backward()
    assert torch.equal(got, x.grad) and got.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_backward_keeps_no_upcast_weight_copy():
    """What the graph saves for the backward: the float8 Parameter, never a bf16 copy of it."""
    layer = nn.Linear(16, 16).to(BF16).requires_grad_(False)
    apply_fp8_base(nn.Sequential(layer), BF16)
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 16, dtype=BF16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert [t.dtype for t in saved] == [FP8] and saved[0] is layer.weight


def test_lycoris_lora_on_fp8_flux_trains_and_the_base_stays_fp8():
    model = tiny_flux().to(BF16)
    ref = rounded_copy(model)
    n = apply_fp8_base(model, BF16)
    assert n == sum(type(m) is nn.Linear for m in ref.modules()) > 20
    net, ref_net = lycoris(model), lycoris(ref)
    ref_net.load_state_dict(net.state_dict())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    args = {k: v.to(BF16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs().items()}
    out = model(**args)[0]
    ref_out = ref(**args)[0]
    assert torch.equal(out, ref_out)  # forward == the bf16 model on the float8-rounded weights
    out.float().square().mean().backward()
    ref_out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for g, r in zip(grads, (p.grad for p in ref_net.parameters())):
        assert torch.equal(g, r)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    after = model.state_dict()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype == FP8 else torch.equal(after[k], v)
               for k, v in base.items())
    assert sum(v.dtype == FP8 for v in after.values()) == n
    assert all(p.grad is None for p in model.parameters())


def test_fp8_blocks_swap_exactly():
    """Block swap moves the float8 Parameters the backward saved: same loss and grads."""
    model = tiny_flux().to(BF16)
    apply_fp8_base(model, BF16)
    net = lycoris(model)
    args = {k: v.to(BF16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs().items()}

    def step():
        for p in net.parameters():
            p.grad = None
        loss = model(**args)[0].float().square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    ref_loss, ref_grads = step()
    blocks = flux_blocks(model)
    fake = FakeBoundary(blocks, len(blocks) - 3)
    swap = enable_block_swap(blocks, 3, device="gpu", offload="cpu", mover=fake)
    swap.prepare()
    loss, grads = step()
    assert len(fake.moves) > 2 * 3 and torch.isfinite(loss)
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_wrapped_or_trainable_layers_are_refused():
    model = tiny_flux()
    lycoris(model)
    with pytest.raises(ConfigError, match="fp8_base.*already wrapped.*before applying the network"):
        apply_fp8_base(model, BF16)
    assert fp8_layers(model) == 0  # nothing half-converted
    layer = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="fp8_base.*trainable"):
        apply_fp8_base(layer, BF16)
    with pytest.raises(ConfigError, match="fp8_base.*compute dtype"):
        apply_fp8_base(layer.requires_grad_(False), torch.int8)


def test_remove_restores_plain_linears_with_rounded_weights():
    model = mlp()
    ref = rounded_copy(model)
    apply_fp8_base(model, BF16)
    assert remove_fp8_base(model) == 2 and fp8_layers(model) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Linear]
    assert "compute_dtype" not in model[0].__dict__
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_blocks_only_keeps_the_model_reporting_its_compute_dtype():
    """Converted whole, the model's first Parameter (and diffusers' model.dtype) reads float8;
    converted block by block (over 99% of FLUX's weights), the model still reads bf16."""
    whole, blocks_only = tiny_flux().to(BF16), tiny_flux().to(BF16)
    apply_fp8_base(whole, BF16)
    assert whole.dtype == FP8 and next(whole.parameters()).dtype == FP8
    n = sum(apply_fp8_base(b, BF16) for b in flux_blocks(blocks_only))
    assert n == sum(fp8_layers(b) for b in flux_blocks(blocks_only)) > 0 and fp8_layers(blocks_only) == n
    assert blocks_only.dtype == BF16 and next(blocks_only.parameters()).dtype == BF16
