"""Data options: caption shuffling and dropout, and masked loss."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param

_DATA = ("LoRA", "Multi-ADDifT")


@dataclass
class DataOptions:
    caption_shuffle: bool = param("bool", False, "Shuffle captions", "Shuffle the comma-separated tags of each caption every step.", modes=_DATA)
    keep_tokens: int = param("int", 0, "Keep tokens", "The first N tags (comma-separated) stay in place when shuffling or dropping tags.", minimum=0, maximum=1000, modes=_DATA)
    caption_dropout_rate: float = param("float", 0.0, "Caption dropout", "Chance that a whole caption is replaced by the empty prompt.", minimum=0, maximum=1, modes=_DATA)
    caption_tag_dropout_rate: float = param("float", 0.0, "Tag dropout", "Chance that each tag (after the kept ones) is left out.", minimum=0, maximum=1, modes=_DATA)
    masked_loss: bool = param("bool", False, "Masked loss", "Weight the loss by each image's alpha channel, or by <image>_mask.png next to it.", modes=_DATA)

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
