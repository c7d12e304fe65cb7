"""FLUX.1 network scope, named as sd-scripts' networks/lora_flux.py names its network_args: the
double/single block lists, per-layer ranks, split_qkv, and the T5-XXL LoRA with its own rate.

Used only for a FLUX model; the UI shows them only then.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..params import ConfigError, param
from .flow import FLUX

# sd-scripts' type_dims, in its order; the rank of those layers (-1: the network rank, 0: none).
LAYER_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                  "single_dim", "single_mod_dim")
_DIM_HELP = "-1 uses the network rank, 0 leaves these layers out (alpha stays network_alpha, as in sd-scripts)."


def block_indices(key: str, text: str) -> frozenset[int] | None:
    """sd-scripts' block index list: None for "all", an empty set for "none", else the indices
    ("0-5,10" is 0 to 5 and 10); anything else is a ConfigError naming the key."""
    spec = str(text).strip().lower()
    if spec in ("", "all"):
        return None
    if spec == "none":
        return frozenset()
    found: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.strip().isdigit() or (dash and not hi.strip().isdigit()):
            raise ConfigError(key, text, "expected all, none, or indices and ranges such as 0-5,10")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ConfigError(key, text, f"the range {part.strip()} runs backwards")
        found.update(range(first, last + 1))
    return frozenset(found)


def _dim(label: str, layers: str) -> int:
    return param("int", -1, label, f"FLUX: rank of the {layers}. {_DIM_HELP}", minimum=-1, maximum=1024,
                 group="flow", families=FLUX)


@dataclass
class FluxNetworkOptions:
    train_double_block_indices: str = param("str", "all", "Double blocks", "FLUX: which double blocks the network covers, as sd-scripts writes it: all, none, or indices and ranges such as 0-5,10.", group="flow", families=FLUX)
    train_single_block_indices: str = param("str", "all", "Single blocks", "FLUX: which single blocks the network covers: all, none, or indices and ranges such as 0-9,20.", group="flow", families=FLUX)
    img_attn_dim: int = _dim("Image attention rank", "double blocks' image attention (qkv and proj)")
    txt_attn_dim: int = _dim("Text attention rank", "double blocks' text attention (qkv and proj)")
    img_mlp_dim: int = _dim("Image MLP rank", "double blocks' image MLP")
    txt_mlp_dim: int = _dim("Text MLP rank", "double blocks' text MLP")
    img_mod_dim: int = _dim("Image modulation rank", "double blocks' image modulation")
    txt_mod_dim: int = _dim("Text modulation rank", "double blocks' text modulation")
    single_dim: int = _dim("Single block rank", "single blocks' linear1 (qkv and MLP) and linear2")
    single_mod_dim: int = _dim("Single modulation rank", "single blocks' modulation")
    split_qkv: bool = param("bool", False, "Split qkv", "FLUX: separate LoRAs for q, k and v (and the single blocks' MLP input) instead of one LoRA on the fused layer. Off, as in sd-scripts, they share one down matrix. LoHa, LoKr and DoRA always train them apart.", group="flow", families=FLUX)
    train_t5xxl: bool = param("bool", False, "Train T5-XXL", "FLUX: a LoRA on T5-XXL as well (lora_te3_ keys). Needs text-encoder training (BASE selected, text-encoder rate above 0); captions are then encoded every step.", group="flow", families=FLUX)
    t5xxl_learning_rate: float | None = param("optfloat", None, "T5-XXL LR", "FLUX: learning rate of the T5-XXL LoRA; empty uses the text-encoder rate.", minimum=0, maximum=100, group="flow", families=FLUX)

    def check(self) -> None:
        """Checks of these options (called by TrainConfig.validate with the whole config)."""
        for key in ("train_double_block_indices", "train_single_block_indices"):
            block_indices(key, getattr(self, key))

    def layer_dims(self) -> dict[str, int]:
        """{sd-scripts dim key: rank} for the layers given a rank of their own."""
        return {key: int(getattr(self, key)) for key in LAYER_DIM_KEYS if int(getattr(self, key)) >= 0}
