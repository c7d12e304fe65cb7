"""``fp8_base``: the frozen denoiser's Linear weights stored in float8 (e4m3fn), half of bf16.

Each converted ``nn.Linear`` keeps its ``weight`` Parameter (same name, same object, so state
dicts, block swap and ``.to(device)`` see it) with float8 data, and its forward upcasts the
weight to the compute dtype (bf16) for the matrix product. The upcast copy is temporary: the
backward saves the float8 Parameter itself and upcasts again, so the activations kept for the
backward hold no bf16 copy of any weight, and a swapped-out block's weights really leave the
device. The base is frozen (no weight or bias gradient); the gradient still flows to the input,
so a network wrapped around the layer trains in its own dtype.

Order: convert before the network is applied. LyCORIS captures each Linear's ``forward`` when
it wraps it, so a layer wrapped earlier would keep calling the plain Linear forward on float8
data; such a layer is refused. The network's DoRA (which rebuilds ``base + delta`` from the
stored weight at each step) is refused with fp8_base by `check_fp8`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.params import ConfigError

FP8 = getattr(torch, "float8_e4m3fn", None)  # PyTorch 2.1 and newer
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _float8_roundtrip(device: torch.device) -> bool:
    """Store three values in float8 on `device` and read them back in bf16."""
    values = torch.tensor([1.0, -0.5, 448.0], dtype=torch.bfloat16)
    back = values.to(device).to(FP8).to(torch.bfloat16).cpu()
    return torch.equal(back, values)


def check_fp8(device: torch.device | str, *, dora: bool = False) -> None:
    """Refuse ``fp8_base`` where it cannot work: a ConfigError (a ValueError) naming the key."""
    if FP8 is None:
        raise ConfigError("fp8_base", True, f"PyTorch {torch.__version__} has no float8 type (2.1 or newer has)")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("fp8_base", True, f"unknown device {device!r} ({err})") from err
    if dev.type == "cpu":
        raise ConfigError("fp8_base", True, "it saves accelerator memory and needs an accelerator; on the CPU "
                                            "training runs in float32, where float8 weights only add an upcast "
                                            "per layer and lose precision")
    try:
        ok = _float8_roundtrip(dev)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise ConfigError("fp8_base", True, f"{dev} cannot store float8_e4m3fn weights ({err})") from err
    if not ok:
        raise ConfigError("fp8_base", True, f"{dev} does not read float8_e4m3fn weights back correctly")
    if dora:
        raise ConfigError("fp8_base", True, "DoRA (network_dora) rebuilds each layer's full weight from the base "
                                            "weight at every step; use it without fp8_base")


class _Fp8Linear(torch.autograd.Function):
    """``x @ W.T + b`` with W stored in float8: upcast in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the float8 Parameter: no bf16 copy outlives this call
        return F.linear(x.to(dtype), weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None, None


class Fp8BaseLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is float8; set by `apply_fp8_base` on existing layers."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, self.weight, self.bias, self.compute_dtype)


def _check_layer(name: str, layer: nn.Linear) -> None:
    if "forward" in layer.__dict__:
        raise ConfigError("fp8_base", True, f"layer {name or '(root)'} is already wrapped (a network was applied "
                                            f"first); convert the base model before applying the network")
    trainable = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
    if trainable:
        raise ConfigError("fp8_base", True, f"layer {name or '(root)'} is trainable; fp8_base stores frozen "
                                            f"base weights only")


def apply_fp8_base(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every plain ``nn.Linear`` weight of `module` in float8; returns how many layers.

    Biases go to `compute_dtype` (they are added in it). Call `check_fp8` for the device first,
    after freezing and dtype casts, before the network is applied. Other layer types (norms,
    embeddings, subclasses of Linear) are left as they are.
    """
    if FP8 is None:
        raise ConfigError("fp8_base", True, f"PyTorch {torch.__version__} has no float8 type")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError("fp8_base", str(compute_dtype), "compute dtype must be bf16, fp16 or fp32")
    layers = [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]
    for name, layer in layers:
        _check_layer(name, layer)
    with torch.no_grad():
        for _, layer in layers:
            layer.weight.data = layer.weight.data.to(FP8)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(compute_dtype)
            layer.__class__ = Fp8BaseLinear
            layer.compute_dtype = compute_dtype
    return len(layers)


def remove_fp8_base(module: nn.Module) -> int:
    """Turn converted layers back into ``nn.Linear`` with compute-dtype weights; returns how many.

    The weights keep their float8 rounding: the original values are not kept anywhere.
    """
    layers = [(n, m) for n, m in module.named_modules() if type(m) is Fp8BaseLinear]
    for name, layer in layers:
        if "forward" in layer.__dict__:
            raise ConfigError("fp8_base", True, f"layer {name or '(root)'} is still wrapped by a network; "
                                                f"remove the network first")
    with torch.no_grad():
        for _, layer in layers:
            layer.weight.data = layer.weight.data.to(layer.compute_dtype)
            layer.__class__ = nn.Linear
            del layer.compute_dtype
    return len(layers)


def fp8_layers(module: nn.Module) -> int:
    """How many layers of `module` hold float8 base weights."""
    return sum(type(m) is Fp8BaseLinear for m in module.modules())
