"""FLUX.1's network scope in the model's own (diffusers) module paths: which blocks a network
covers, the sd-scripts layer kind of each layer (for per-layer ranks), and the parts of BFL's fused
layers (q/k/v, and the single blocks' q/k/v/MLP input) that share one down matrix without split_qkv.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..config.options.fluxnet import block_indices
from ..config.params import ConfigError
from .flux_keys import BLOCK_DOUBLE, BLOCK_SINGLE, bfl_place

if TYPE_CHECKING:
    from .bundle import ModelBundle

_BLOCK_LISTS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}


def block_selector(double: Iterable[int] | None, single: Iterable[int] | None) -> Callable[[str], bool]:
    """A predicate over transformer module paths: None for a list keeps all of those blocks."""
    wanted = {"double": None if double is None else frozenset(double),
              "single": None if single is None else frozenset(single)}

    def keep(name: str) -> bool:
        parts = name.split(".")
        chosen = wanted.get(_BLOCK_LISTS.get(parts[0], ""))
        if chosen is None or len(parts) < 2 or not parts[1].isdigit():
            return True  # all of them, or a path above a single block
        return int(parts[1]) in chosen

    return keep


def layer_kind(module_path: str) -> str | None:
    """sd-scripts' dim key of a layer inside a block (``transformer_blocks.0.attn.to_q`` ->
    ``img_attn_dim``), or None for a path that is no such layer."""
    parts = module_path.split(".")
    if len(parts) < 3 or parts[0] not in _BLOCK_LISTS or not parts[1].isdigit():
        return None
    inner = "_".join(parts[2:])
    if parts[0] == "transformer_blocks":
        place = BLOCK_DOUBLE.get(inner)
        return None if place is None else "_".join(place[0].split("_")[:2]) + "_dim"  # img_attn_qkv -> img_attn_dim
    place = BLOCK_SINGLE.get(inner)
    if place is None:
        return None
    return "single_mod_dim" if place[0].startswith("modulation") else "single_dim"


def fused_groups(lora_names: Iterable[str]) -> list[list[str]]:
    """In-memory network module names grouped by the BFL layer they are parts of (groups of two
    or more parts only), each in part order."""
    by_file: dict[str, list[tuple[int, str]]] = {}
    for name in lora_names:
        if not name.startswith("lora_unet_"):
            continue
        file_name, part, parts = bfl_place(name)
        if parts > 1:
            by_file.setdefault(file_name, []).append((part, name))
    return [[n for _, n in sorted(members)] for members in by_file.values() if len(members) > 1]


class FluxNetworkHooks:
    """The Family hooks of FLUX.1's network scope and file layout (mixed into `Flux`)."""

    label: ClassVar[str]
    double_blocks: ClassVar[int] = 19  # FLUX.1's own counts, for the block-ID list
    single_blocks: ClassVar[int] = 38

    # blocks -----------------------------------------------------------------------------------------
    def block_ids(self) -> tuple[str, ...]:
        return (*(f"DB{i:02d}" for i in range(self.double_blocks)), *(f"SB{i:02d}" for i in range(self.single_blocks)))

    def block_id(self, module_name: str) -> str | None:
        parts = module_name.split(".")
        if len(parts) < 2 or not parts[1].isdigit():
            return None
        prefix = {"transformer_blocks": "DB", "single_transformer_blocks": "SB"}.get(parts[0])
        return None if prefix is None else f"{prefix}{int(parts[1]):02d}"

    def network_scope(self, cfg: Any) -> dict[str, Any]:
        """Block lists, per-layer ranks, split_qkv and train_t5xxl, as sd-scripts' network_args."""
        return {"double": block_indices("train_double_block_indices", cfg.train_double_block_indices),
                "single": block_indices("train_single_block_indices", cfg.train_single_block_indices),
                "dims": cfg.layer_dims(), "split_qkv": bool(cfg.split_qkv), "train_t5xxl": bool(cfg.train_t5xxl)}

    def network_args(self, cfg: Any) -> dict[str, str]:
        args = {"split_qkv": str(bool(cfg.split_qkv)), "train_t5xxl": str(bool(cfg.train_t5xxl))}
        args.update({key: str(dim) for key, dim in cfg.layer_dims().items()})
        for key in ("train_double_block_indices", "train_single_block_indices"):
            if block_indices(key, getattr(cfg, key)) is not None:
                args[key] = str(getattr(cfg, key))
        return args

    def selector(self, blocks: Iterable[str], element: str,
                 scope: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
        """FLUX's own block lists (train_double/single_block_indices); the TrainTrain U-Net block
        IDs do not apply to its blocks."""
        if element != "Full":
            raise ConfigError("network_element", element, f"{self.label} networks cover whole blocks (Full)")
        scope = scope or {}
        return block_selector(scope.get("double"), scope.get("single"))

    def layer_dims(self, scope: Mapping[str, Any]) -> dict[str, int]:
        return dict(scope.get("dims", {}))

    def layer_kind(self, module_path: str) -> str | None:
        return layer_kind(module_path)

    def shared_down_groups(self, scope: Mapping[str, Any], lora_names: list[str]) -> list[list[str]]:
        """Without split_qkv, the parts of each fused BFL layer share one down (sd-scripts' default)."""
        return [] if scope.get("split_qkv", False) else fused_groups(lora_names)

    def text_encoder_lrs(self, cfg: Any) -> dict[str, float]:
        """T5's LoRA (in memory lora_te2_, after CLIP-L's lora_te1_) at t5xxl_learning_rate."""
        return {} if cfg.t5xxl_learning_rate is None else {"lora_te2_": float(cfg.t5xxl_learning_rate)}

    # networks and files --------------------------------------------------------------------------------
    def network_targets(self, trains_convs: bool) -> list[str]:
        return ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    def network_text_encoders(self, bundle: ModelBundle,
                              scope: Mapping[str, Any] | None = None) -> list[torch.nn.Module]:
        """CLIP-L, and T5-XXL with train_t5xxl."""
        return list(bundle.text_encoders[:2 if (scope or {}).get("train_t5xxl") else 1])

    def to_file(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from .flux_keys import to_file

        return to_file(state_dict)

    def from_file(self, state_dict: dict[str, torch.Tensor],
                  target: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
        from .flux_keys import from_file

        return from_file(state_dict, target)
