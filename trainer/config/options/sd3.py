"""Options of SD3 / SD3.5 only, named and defaulted as sd-scripts' sd3_train_network.py names them.

The options SD3 shares with FLUX.1 (clip_l, t5xxl, ae, weighting_scheme, logit_mean, logit_std,
mode_scale, t5xxl_max_token_length, apply_t5_attn_mask) live in flow.py with both families listed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..params import ConfigError, param

SD3 = ("sd3",)


@dataclass
class SD3Options:
    clip_g: str = param("path", "", "CLIP-G file", "SD3: the CLIP-G (OpenCLIP bigG) text encoder file (clip_g.safetensors) when the model file holds only the transformer.", group="flow", families=SD3)
    training_shift: float = param("float", 1.0, "Training shift", "SD3: σ' = s·σ/(1+(s−1)σ) applied to the drawn σ; above 1 trains more at high noise (overall structure), below 1 at low noise (details). sd-scripts' default 1.0.", minimum=0.001, maximum=100, group="flow", families=SD3)

    def check(self) -> None:
        """Checks of these options (called by TrainConfig.validate with the whole config)."""
        if not float(self.training_shift) > 0:
            raise ConfigError("training_shift", self.training_shift, "must be a positive number")
