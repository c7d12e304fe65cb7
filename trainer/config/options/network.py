"""Network options: LoRA+ learning-rate ratios and per-block learning rates and ranks."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import ConfigError, param

# LyCORIS and sd-scripts treat lora_up as LoRA+'s B matrix; LoHa/LoKr have no such factor.
LORAPLUS_TYPES = ("lierla", "c3lier")


@dataclass
class NetworkOptions:
    loraplus_lr_ratio: float = param("float", 0.0, "LoRA+ ratio", "LoRA+ (lierla/c3lier): the lora_up (B) matrices train at this many times the learning rate; 0 turns it off (16 is the paper's choice).", minimum=0, maximum=1000, group="network")
    loraplus_unet_lr_ratio: float | None = param("optfloat", None, "LoRA+ ratio (U-Net)", "LoRA+ ratio for the U-Net only; empty uses the LoRA+ ratio, 0 turns LoRA+ off for the U-Net.", minimum=0, maximum=1000, group="network")
    loraplus_text_encoder_lr_ratio: float | None = param("optfloat", None, "LoRA+ ratio (text encoder)", "LoRA+ ratio for the text encoder only; empty uses the LoRA+ ratio, 0 turns LoRA+ off for the text encoder.", minimum=0, maximum=1000, modes=("LoRA",), group="network")
    network_block_lr_weights: str = param("str", "", "Block LR weights", "Per-block learning-rate multipliers, e.g. IN01=0.5, M00=1, OUT11=0 (BASE = text encoder); unnamed blocks keep 1, 0 freezes a block. Wins over the down/mid/up form.", group="network")
    down_lr_weight: str = param("str", "", "Down LR weight", "sd-scripts form: 12 comma-separated multipliers for IN00-IN11, or sine, cosine, linear, reverse_linear, zeros with an optional +number (SDXL uses the first 9).", group="network")
    mid_lr_weight: str = param("str", "", "Mid LR weight", "sd-scripts form: one multiplier for M00.", group="network")
    up_lr_weight: str = param("str", "", "Up LR weight", "sd-scripts form: 12 comma-separated multipliers for OUT00-OUT11, or a preset name as for down (SDXL uses the first 9).", group="network")
    network_dora_on_output: bool = param("bool", False, "DoRA magnitude per output channel", "Off (default): the DoRA magnitude is per input channel, which A1111 1.10, Forge and ComfyUI apply. On: per output channel, the layout LyCORIS's own loader (lycoris.kohya.create_network_from_weights, as sd-scripts uses it) reads; Forge and ComfyUI apply it too, A1111 1.10 applies it wrongly.", group="network")
    network_block_dims: str = param("str", "", "Block ranks", "Per-block rank (dim), e.g. IN04=8, OUT11=32 (BASE = text encoder); unnamed blocks use the rank. Alpha keeps the alpha/rank ratio.", group="network")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
        from ...networks.blockctl import block_dims, lr_weights  # blockctl imports nothing from options

        ratios = (("loraplus_lr_ratio", self.loraplus_lr_ratio),
                  ("loraplus_unet_lr_ratio", self.loraplus_unet_lr_ratio),
                  ("loraplus_text_encoder_lr_ratio", self.loraplus_text_encoder_lr_ratio))
        for name, ratio in ratios:
            if ratio and self.network_type not in LORAPLUS_TYPES:
                raise ConfigError(name, ratio, f"LoRA+ works with lierla and c3lier (their lora_up matrices), "
                                               f"not {self.network_type}")
        lr_weights(self)
        block_dims(self)
