"""TrainTrain / LoRA Block Weight block IDs for diffusers U-Net module paths.

The IDs follow the ldm U-Net's ``input_blocks``, ``middle_block`` and
``output_blocks`` indices. Every SD U-Net has two layers per down level and
three per up level, so one formula serves SD1/SD2 (4 levels: IN00-IN11,
M00, OUT00-OUT11) and SDXL (3 levels: IN00-IN08, M00, OUT00-OUT08):

- ``conv_in`` is IN00;
- ``down_blocks.d.{resnets,attentions}.j`` is IN(1 + 3d + j);
- ``down_blocks.d.downsamplers.0`` is IN(3 + 3d);
- ``mid_block`` is M00;
- ``up_blocks.u.{resnets,attentions}.j`` is OUT(3u + j), and
  ``up_blocks.u.upsamplers.0`` sits in the last layer, OUT(3u + 2).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from ..config.params import ConfigError

if TYPE_CHECKING:
    from .base import Family

_DOWN_LAYERS = 2  # resnets (and attentions) per down level in every SD U-Net
_UP_LAYERS = 3


def family_block_ids(family: int | str | Family) -> tuple[str, ...]:
    """The U-Net block IDs of a U-Net with `family` levels (or a U-Net family's), in order (BASE not included)."""
    levels = _levels(family)
    n_in = 1 + (_DOWN_LAYERS + 1) * levels - 1  # the last level has no downsampler
    n_out = _UP_LAYERS * levels
    return (*(f"IN{i:02d}" for i in range(n_in)), "M00", *(f"OUT{i:02d}" for i in range(n_out)))


def _levels(family: int | str | Family) -> int:
    """Down levels of the U-Net: given, or the U-Net family's."""
    if isinstance(family, int):
        return family
    from . import get_family

    levels = getattr(get_family(family), "unet_levels", None)
    if levels is None:
        raise ValueError(f"family: {family} has no U-Net block IDs")
    return levels


def _index(part: str) -> int | None:
    return int(part) if part.isdigit() else None


def block_id(family: int | str | Family, module_name: str) -> str | None:
    """TrainTrain block ID of a diffusers U-Net module path, or None.

    None means the module lies in no single block (``time_embedding``,
    ``conv_out``, a whole ``down_blocks.1``…) or outside the family's range.
    """
    levels = _levels(family)
    parts = module_name.split(".")
    head = parts[0]
    if head == "conv_in":
        return "IN00"
    if head == "mid_block":
        return "M00"
    if head not in ("down_blocks", "up_blocks") or len(parts) < 4:
        return None
    level, kind, layer = _index(parts[1]), parts[2], _index(parts[3])
    if level is None or layer is None or level >= levels:
        return None
    if head == "down_blocks":
        if kind in ("resnets", "attentions") and layer < _DOWN_LAYERS:
            return f"IN{1 + 3 * level + layer:02d}"
        if kind == "downsamplers" and layer == 0 and level < levels - 1:
            return f"IN{3 + 3 * level:02d}"
        return None
    if kind in ("resnets", "attentions") and layer < _UP_LAYERS:
        return f"OUT{3 * level + layer:02d}"
    if kind == "upsamplers" and layer == 0 and level < levels - 1:
        return f"OUT{3 * level + 2:02d}"
    return None


def _attention_layer(parts: list[str]) -> str | None:
    """'attn1'/'attn2' when the path runs through one, else None."""
    return next((p for p in parts if p in ("attn1", "attn2")), None)


def unet_selector(family: int | str | Family, blocks: Iterable[str], element: str = "Full") -> Callable[[str], bool]:
    """A predicate: does the network cover this U-Net module path?

    `blocks` are TrainTrain IDs (BASE and IDs the family lacks are ignored).
    `element` narrows the covered layers to attention: CrossAttention keeps
    only ``attn2`` layers, SelfAttention only ``attn1``. A path that holds
    several blocks (``down_blocks.1``) or the attention container itself
    answers True so that a walk over the model still reaches its layers.
    """
    levels = _levels(family)
    wanted = set(blocks)
    if element not in ("Full", "CrossAttention", "SelfAttention"):
        raise ConfigError("network_element", element, "expected Full, CrossAttention or SelfAttention")
    attn = {"CrossAttention": "attn2", "SelfAttention": "attn1"}.get(element)

    def keep(name: str) -> bool:
        bid = block_id(levels, name)
        if bid is not None and bid not in wanted:
            return False
        if attn is None or not name:
            return True
        parts = name.split(".")
        if "attentions" not in parts:
            # resnets, samplers and top-level layers carry no attention
            return parts[0] in ("down_blocks", "up_blocks", "mid_block") and len(parts) <= 2
        if parts[-2] == "attentions":
            return True  # the Transformer2DModel container itself
        return _attention_layer(parts) == attn

    return keep
