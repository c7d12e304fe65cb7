"""Optimizer parameter groups of a network: LoRA+ ratios and per-block learning-rate weights.

Group names say what a group holds: "unet" and "text_encoder" (the parts at
their learning rate), "<part>_up" (LoRA+'s lora_up matrices at ratio x lr),
"unet_IN04" (a block whose weight is not 1) and "unet_IN04_up". Everything is
plain param groups, so every optimizer and LambdaLR scheduler handles them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, field

from .blockctl import lr_weights

if TYPE_CHECKING:
    from ..families.base import Family

UNET, TE = "unet", "text_encoder"


@dataclass(frozen=True)
class GroupPlan:
    """LoRA+ ratios (0: off) per part and learning-rate weights per block ID."""

    unet_ratio: float = 0.0
    te_ratio: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)
    te_rates: dict[str, float] = field(default_factory=dict)  # {module name prefix: rate} (FLUX's T5)

    @classmethod
    def from_config(cls, cfg, family: Family | None = None) -> "GroupPlan":
        ratio = float(cfg.loraplus_lr_ratio or 0.0)
        unet = ratio if cfg.loraplus_unet_lr_ratio is None else float(cfg.loraplus_unet_lr_ratio)
        te = ratio if cfg.loraplus_text_encoder_lr_ratio is None else float(cfg.loraplus_text_encoder_lr_ratio)
        rates = family.text_encoder_lrs(cfg) if family is not None else {}
        return cls(unet_ratio=unet, te_ratio=te, weights=lr_weights(cfg), te_rates=rates)

    def te_part(self, module, lr: float) -> tuple[str, float]:
        """(group name, rate) of a text-encoder module: its own rate where the family gives one
        (never while the text encoders are frozen at 0)."""
        name = getattr(module, "lora_name", "")
        for prefix, rate in self.te_rates.items():
            if name.startswith(prefix):
                return f"{TE}_{prefix.removeprefix('lora_').strip('_')}", rate if lr != 0 else 0.0
        return TE, lr

    def weight(self, block: str | None) -> float:
        return self.weights.get(block, 1.0) if block is not None else 1.0


def module_block(family: Family, module, part: str) -> str | None:
    """Block ID of a network module: BASE for the text encoder, else from its U-Net path."""
    if part == TE:
        return "BASE"
    prefix = "lora_unet_"
    path = getattr(module, "lora_name", "")[len(prefix):]
    return _block_of_flat(family, path)


def _block_of_flat(family: Family, flat: str) -> str | None:
    """block_id for a kohya name whose dots became underscores (``down_blocks_1_attentions_0_...``)."""
    return family.block_id(".".join(_rejoin(flat.split("_"))))


def _rejoin(parts: list[str]) -> list[str]:
    """['down', 'blocks', '1', ...] -> ['down_blocks', '1', ...]: only the heads contain '_'."""
    if len(parts) >= 2 and parts[1] == "blocks" and parts[0] in ("down", "up"):
        return [f"{parts[0]}_blocks", *parts[2:]]
    if len(parts) >= 2 and parts[0] == "mid" and parts[1] == "block":
        return ["mid_block", *parts[2:]]
    return parts


def build_groups(plan: GroupPlan, family: Family, parts: list[tuple[str, list, float]]) -> list[dict]:
    """Groups for (part name, modules, lr) triples, in a stable order.

    A block of weight 0 is left out while its part trains (it stays frozen);
    with the part's lr at 0 every parameter is returned, so freezing them all works.
    """
    groups: dict[str, dict] = {}
    seen: set[int] = set()  # a down matrix shared by several modules is one parameter
    for part, modules, part_lr in parts:
        ratio = plan.unet_ratio if part == UNET else plan.te_ratio
        for module in modules:
            block = module_block(family, module, part)
            weight = plan.weight(block)
            if weight == 0 and part_lr != 0:
                continue
            name, lr = plan.te_part(module, part_lr) if part == TE else (part, part_lr)
            name = name if weight == 1 or part == TE else f"{part}_{block}"
            for pname, param in module.named_parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                up = ratio > 0 and "lora_up" in pname
                key = f"{name}_up" if up else name
                group = groups.setdefault(key, {"params": [], "lr": lr * weight * (ratio if up else 1.0),
                                                "name": key})
                group["params"].append(param)
    return list(groups.values())


def frozen_params(plan: GroupPlan, family: Family, parts: list[tuple[str, list]]) -> list:
    """Parameters of weight-0 blocks: they never train, so they need no gradient."""
    return [p for part, modules in parts for m in modules
            if plan.weight(module_block(family, m, part)) == 0 for p in m.parameters()]


__all__ = ["GroupPlan", "build_groups", "frozen_params", "module_block"]
