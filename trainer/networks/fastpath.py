"""Bypass forwards without LyCORIS's unit-scalar multiplies, for plain LoCon, LoHa and LoKr modules.

LyCORIS's bypass forwards multiply each module's output (or, for LoHa convs, its rebuilt
delta weight) by ``scalar``, a fixed 1 unless the module learns it, and LoHa convs and LoKr
convs also by the call's ``scale``, 1 in training. Each is an elementwise pass over
activations or a full weight, and another in the backward, that changes no value (x * 1.0 is
exact). Where a module is plain (no tucker, DoRA, rank dropout, dropout or learned scalar),
its ``bypass_forward_diff`` is replaced on the instance by the same LyCORIS functional call
without those multiplies; weights, names and files are untouched, values and gradients are
bit-identical (tests/test_bench_lora_forward.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Diff = Callable[..., Tensor]


def skip_unit_scalar(lyco) -> int:
    """Give every plain LoCon/LoHa/LoKr module of `lyco` the lean bypass diff; returns how many."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    makers: dict[type, Callable[[object], Diff]] = {
        LoConModule: _locon_diff, LohaModule: _loha_diff, LokrModule: _lokr_diff}
    count = 0
    for module in lyco.loras:
        maker = makers.get(type(module))
        if maker is None or not _plain(module):
            continue
        module.bypass_forward_diff = maker(module)
        count += 1
    return count


def _plain(module) -> bool:
    """Bypass mode with nothing that needs the scalar or the per-call scale: no tucker, DoRA, dropout."""
    if not getattr(module, "bypass_mode", False):
        return False
    if getattr(module, "tucker", False) or module.wd or module.rank_dropout:
        return False
    # LoCon keeps its dropout as a module, LoHa/LoKr as a rate (and `drop` as the module).
    for drop in (getattr(module, "dropout", 0), getattr(module, "drop", None)):
        if isinstance(drop, torch.nn.Module) and not isinstance(drop, torch.nn.Identity):
            return False
        if isinstance(drop, (int, float)) and drop:
            return False
    scalar = module.scalar
    return not isinstance(scalar, torch.nn.Parameter) and scalar.numel() == 1 and float(scalar) == 1.0


def _conv_args(module) -> dict:
    return dict(module.kw_dict) if module.module_type.startswith("conv") else {}


def _locon_diff(module) -> Diff:
    """LoCon: up(down(x)) * gamma, as LyCORIS's functional bypass computes it."""
    from lycoris.functional.locon import bypass_forward_diff as bypass_diff

    down, up = module.lora_down, module.lora_up
    extra = ({"stride": down.stride, "padding": down.padding, "dilation": down.dilation, "groups": down.groups}
             if module.isconv else {})

    def diff(x: Tensor, scale: float = 1) -> Tensor:
        return bypass_diff(x, None, down.weight.to(x), up.weight.to(x), None,
                           gamma=module.scale * scale, extra_args=extra)

    return diff


def _loha_diff(module) -> Diff:
    """LoHa: linears through LyCORIS's functional bypass, convs through the rebuilt delta weight."""
    from lycoris.functional.loha import bypass_forward_diff as bypass_diff

    if module.module_type != "linear":
        def conv_diff(x: Tensor, scale: float = 1) -> Tensor:
            weight = module.get_weight(module.shape).to(x)  # already times alpha/rank
            if scale != 1:
                weight = weight * scale
            return module.op(x, weight, **module.kw_dict)

        return conv_diff

    def diff(x: Tensor, scale: float = 1) -> Tensor:
        gamma = torch.tensor(module.scale * scale, dtype=x.dtype, device=x.device)
        return bypass_diff(x, None, module.hada_w1_b.to(x), module.hada_w1_a.to(x), module.hada_w2_b.to(x),
                           module.hada_w2_a.to(x), None, None, gamma=gamma, extra_args=module.kw_dict)

    return diff


def _lokr_diff(module) -> Diff:
    """LoKr: kron(w1, w2) applied by LyCORIS's grouped bypass, the scale folded into its one multiply."""
    from lycoris.functional.lokr import kron_bypass

    conv = module.module_type.startswith("conv")
    extra = _conv_args(module)

    def diff(h: Tensor, scale: float = 1) -> Tensor:
        w1, w1a, w1b, w2, w2a, w2b = _lokr_factors(module, h, conv)
        # Convs pin the eager torch path, as the module's own conv forward runs.
        return kron_bypass(h, w1, w1a, w1b, w2, w2a, w2b, None, scale=module.scale * scale,
                           extra_args=extra, backend="torch" if conv else None)

    return diff


def _lokr_factors(module, h: Tensor, conv: bool) -> tuple:
    """The factors in the input's dtype, w2_b unflattened to its kernel window for convs."""
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=h.device, dtype=h.dtype)

    w1 = cast(module.lokr_w1) if module.use_w1 else None
    w1a = None if module.use_w1 else cast(module.lokr_w1_a)
    w1b = None if module.use_w1 else cast(module.lokr_w1_b)
    if module.use_w2:
        return w1, w1a, w1b, cast(module.lokr_w2), None, None
    w2b = module.lokr_w2_b
    if conv:  # stored as (rank, vq * k1 * k2); the grouped conv needs (rank, vq, k1, k2)
        w2b = w2b.view(w2b.shape[0], -1, *module.shape[2:])
    return w1, w1a, w1b, None, cast(module.lokr_w2_a), cast(w2b)
