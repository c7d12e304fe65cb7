"""Options of the flow-matching families (FLUX.1): component files, timestep sampling, guidance, T5.

Named and defaulted as sd-scripts names them, so its documentation applies. They are used only
when the model is of a family listed in `families`; the UI shows them only then.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..params import ConfigError, param

FLUX = ("flux",)
FLOW = ("flux", "sd3")  # options SD3 shares with FLUX.1
FLUX_ZIMAGE = ("flux", "zimage")  # FLUX.1's timestep and prediction settings, which Z-Image reads too
ALL_FLOW = ("flux", "sd3", "zimage")  # the weighting schemes every flow family draws σ with
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # the mode density is a bijection of [0, 1] only up to here


@dataclass
class FlowOptions:
    clip_l: str = param("path", "", "CLIP-L file", "FLUX: the CLIP-L text encoder file (clip_l.safetensors) when the model file holds only the transformer.", group="flow", families=FLOW)
    t5xxl: str = param("path", "", "T5-XXL file", "FLUX: the T5-XXL encoder file (t5xxl_fp16.safetensors or an fp8 one) when the model file holds only the transformer.", group="flow", families=FLOW)
    ae: str = param("path", "", "Autoencoder file", "FLUX: the autoencoder file (ae.safetensors) when the model file holds only the transformer.", group="flow", families=FLOW)
    guidance_scale: float = param("float", 1.0, "Guidance scale", "FLUX.1 dev's guidance input while training (1.0 is what sd-scripts recommends); schnell has none.", minimum=0, maximum=100, group="flow", families=FLUX)
    timestep_sampling: str = param("choice", "sigma", "Timestep sampling", "How σ is drawn: sigma (the weighting scheme's density over the shifted schedule), uniform, sigmoid (sigmoid of sigmoid_scale·N(0,1)), shift (sigmoid, then discrete_flow_shift), flux_shift (sigmoid, then FLUX's resolution-dependent shift).", choices=TIMESTEP_SAMPLINGS, group="flow", families=FLUX_ZIMAGE)
    sigmoid_scale: float = param("float", 1.0, "Sigmoid scale", "Scale of the normal draw for sigmoid, shift and flux_shift sampling.", minimum=0.001, maximum=100, group="flow", families=FLUX_ZIMAGE)
    discrete_flow_shift: float = param("float", 3.1582, "Discrete flow shift", "σ' = s·σ/(1+(s−1)σ) for shift and sigma sampling; 3.1582 as sd-scripts recommends.", minimum=0.001, maximum=100, group="flow", families=FLUX_ZIMAGE)
    weighting_scheme: str = param("choice", "uniform", "Weighting scheme", "sigma sampling's density (logit_normal, mode, uniform) and sigma_scaled's loss weight (sigma_sqrt, cosmap).", choices=WEIGHTING_SCHEMES, group="flow", families=ALL_FLOW)
    logit_mean: float = param("float", 0.0, "Logit mean", "Mean of the logit-normal density.", minimum=-100, maximum=100, group="flow", families=ALL_FLOW)
    logit_std: float = param("float", 1.0, "Logit std", "Standard deviation of the logit-normal density.", minimum=0.001, maximum=100, group="flow", families=ALL_FLOW)
    mode_scale: float = param("float", 1.29, "Mode scale", "Scale of the mode density (between -1 and 1.75).", minimum=-1, maximum=MODE_SCALE_MAX, group="flow", families=ALL_FLOW)
    model_prediction_type: str = param("choice", "sigma_scaled", "Model prediction type", "raw: the output is the velocity; additive: output + noisy input; sigma_scaled: output·(−σ) + noisy input (sd-scripts' default; its docs now recommend raw).", choices=PREDICTION_TYPES, group="flow", families=FLUX_ZIMAGE)
    t5xxl_max_token_length: int = param("int", 0, "T5 tokens", "T5-XXL prompt length; 0 is the model's own (512 for dev, 256 for schnell).", minimum=0, maximum=512, group="flow", families=FLOW)
    blocks_to_swap: int = param("int", 0, "Blocks to swap", "FLUX: keep this many transformer blocks in CPU memory and move each to the device only while it computes (forward and backward): less device memory, slower steps. sd-scripts' figures: 16 GB with swap, 12 GB with 16 blocks and 8-bit AdamW.", minimum=0, maximum=100, group="flow", families=FLUX)
    fp8_base: bool = param("bool", False, "fp8 base weights", "FLUX: store the frozen transformer's Linear weights in float8 (e4m3) and compute in bf16: about half the weight memory. Needs an accelerator.", group="flow", families=FLUX)
    apply_t5_attn_mask: bool = param("bool", False, "T5 attention mask", "Mask T5's padding tokens when encoding prompts, and zero their outputs.", group="flow", families=FLOW)

    def check(self) -> None:
        """Checks of these options (called by TrainConfig.validate with the whole config)."""
        if not -1.0 <= float(self.mode_scale) <= MODE_SCALE_MAX:
            raise ConfigError("mode_scale", self.mode_scale, f"must be between -1 and {MODE_SCALE_MAX:.4f}")
