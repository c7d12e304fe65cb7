"""Network options: LoRA+ learning-rate ratios and per-block learning rates and ranks."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param


@dataclass
class NetworkOptions:
    loraplus_lr_ratio: float = param("float", 0.0, "LoRA+ ratio", "LoRA+: the up (B) matrices train at this many times the learning rate; 0 turns it off (16 is the paper's choice).", minimum=0, maximum=1000)
    loraplus_unet_lr_ratio: float | None = param("optfloat", None, "LoRA+ ratio (U-Net)", "LoRA+ ratio for the U-Net only; empty uses the LoRA+ ratio.", minimum=0, maximum=1000)
    loraplus_text_encoder_lr_ratio: float | None = param("optfloat", None, "LoRA+ ratio (text encoder)", "LoRA+ ratio for the text encoder only; empty uses the LoRA+ ratio.", minimum=0, maximum=1000, modes=("LoRA",))
    network_block_lr_weights: str = param("str", "", "Block LR weights", "Per-block learning-rate multipliers, e.g. IN01=0.5, M00=1, OUT11=0; unnamed blocks keep 1.")
    down_lr_weight: str = param("str", "", "Down LR weight", "sd-scripts form: 12 comma-separated multipliers for IN00-IN11.")
    mid_lr_weight: str = param("str", "", "Mid LR weight", "sd-scripts form: one multiplier for M00.")
    up_lr_weight: str = param("str", "", "Up LR weight", "sd-scripts form: 12 comma-separated multipliers for OUT00-OUT11.")
    network_block_dims: str = param("str", "", "Block ranks", "Per-block rank (dim), e.g. IN04=8, OUT11=32; unnamed blocks use the rank.")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
