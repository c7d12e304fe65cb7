"""Data options: caption shuffling and dropout, and masked loss (LoRA mode)."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param

# Multi-ADDifT builds its own pair batches and text cache, which do not apply these yet.
_LORA = ("LoRA",)
_NOT_CACHED = " Captions then change every step, so text-encoder outputs are not cached (slower steps)."


@dataclass
class DataOptions:
    caption_shuffle: bool = param(
        "bool", False, "Shuffle captions",
        "Shuffle the comma-separated tags of each caption every time it is used; the first "
        "'Keep tokens' tags stay in front." + _NOT_CACHED, modes=_LORA, group="captions")
    keep_tokens: int = param(
        "int", 0, "Keep tokens",
        "The first N comma-separated tags stay in place and are never dropped when shuffling or "
        "dropping tags. The trigger word, which is put first, counts as one tag.",
        minimum=0, maximum=1000, modes=_LORA, group="captions")
    caption_dropout_rate: float = param(
        "float", 0.0, "Caption dropout",
        "Chance that a whole caption is replaced by the empty prompt each time it is used. "
        "Text-encoder outputs stay cached (the empty prompt is one more cached caption).",
        minimum=0, maximum=1, modes=_LORA, group="captions")
    caption_tag_dropout_rate: float = param(
        "float", 0.0, "Tag dropout",
        "Chance that each tag after the kept ones is left out each time a caption is used." + _NOT_CACHED,
        minimum=0, maximum=1, modes=_LORA, group="captions")
    masked_loss: bool = param(
        "bool", False, "Masked loss",
        "Weight the loss by a mask: <image>_mask.png next to the image (grayscale, white = learn, "
        "black = ignore), else the image's transparency. Images without either count everywhere. "
        "Files named *_mask.png are never trained on as images.", modes=_LORA, group="data")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate).

        Every combination is valid: each value's range is checked on its own, and
        keep_tokens without shuffling or tag dropout simply has nothing to keep in place.
        """
