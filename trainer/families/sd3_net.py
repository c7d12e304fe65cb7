"""SD3's network scope in the model's own (diffusers) module paths: the joint blocks a network covers,
their block IDs (JB00...), the q/k/v parts that share one down matrix in sd-scripts' fused layout
without split_qkv, T5's own rate, and the file layout (sd3_keys.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..config.params import ConfigError

if TYPE_CHECKING:
    from .bundle import ModelBundle

MAX_BLOCKS = 38  # SD3.5 large; medium has 24


class SD3NetworkHooks:
    """The Family hooks of SD3's network scope and file layout (mixed into `SD3`)."""

    label: ClassVar[str]

    def block_ids(self) -> tuple[str, ...]:
        return tuple(f"JB{i:02d}" for i in range(MAX_BLOCKS))

    def block_id(self, module_name: str) -> str | None:
        parts = module_name.split(".")
        if len(parts) < 2 or parts[0] != "transformer_blocks" or not parts[1].isdigit():
            return None
        return f"JB{int(parts[1]):02d}"

    def network_scope(self, cfg: Any) -> dict[str, Any]:
        return {"split_qkv": bool(cfg.split_qkv), "train_t5xxl": bool(cfg.train_t5xxl)}

    def network_args(self, cfg: Any) -> dict[str, str]:
        return {"split_qkv": str(bool(cfg.split_qkv)), "train_t5xxl": str(bool(cfg.train_t5xxl))}

    def selector(self, blocks: Iterable[str], element: str,
                 scope: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
        """Every joint block (the TrainTrain U-Net block IDs do not apply to an MMDiT)."""
        if element != "Full":
            raise ConfigError("network_element", element, f"{self.label} networks cover whole blocks (Full)")
        return lambda name: True

    def shared_down_groups(self, scope: Mapping[str, Any], lora_names: list[str]) -> list[list[str]]:
        """Without split_qkv, q/k/v of each attention share one down (sd-scripts' default)."""
        from .sd3_keys import fused_groups

        return [] if scope.get("split_qkv", False) else fused_groups(lora_names)

    def text_encoder_lrs(self, cfg: Any) -> dict[str, float]:
        """T5's LoRA (lora_te3_, after CLIP-L's and CLIP-G's) at t5xxl_learning_rate."""
        return {} if cfg.t5xxl_learning_rate is None else {"lora_te3_": float(cfg.t5xxl_learning_rate)}

    def network_targets(self, trains_convs: bool) -> list[str]:
        return ["JointTransformerBlock"]

    def network_text_encoders(self, bundle: ModelBundle,
                              scope: Mapping[str, Any] | None = None) -> list[torch.nn.Module]:
        """CLIP-L and CLIP-G, and T5-XXL with train_t5xxl (when the model has one)."""
        from .sd3_files import NoT5

        tes = list(bundle.text_encoders[:2])
        t5 = bundle.text_encoders[2]
        if (scope or {}).get("train_t5xxl"):
            if isinstance(t5, NoT5):
                raise ConfigError("train_t5xxl", True, "this model has no T5-XXL; choose the t5xxl file or turn it off")
            tes.append(t5)
        return tes

    def to_file(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from .sd3_keys import to_file

        return to_file(state_dict)

    def from_file(self, state_dict: dict[str, torch.Tensor],
                  target: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
        from .sd3_keys import from_file

        return from_file(state_dict, target)
