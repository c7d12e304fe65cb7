"""Options of the Z-Image family: its Qwen3 text-encoder file and prompt length.

The autoencoder file is the `vae` field (Z-Image uses FLUX.1's ae.safetensors). The flow-matching
settings (timestep_sampling, discrete_flow_shift, weighting_scheme, ...) are read from the same
fields FLUX.1 uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param

ZIMAGE = ("zimage",)


@dataclass
class ZImageOptions:
    qwen3: str = param("path", "", "Qwen3 file", "Z-Image: the Qwen3 text-encoder file (qwen_3_4b.safetensors) when the model file holds only the transformer; its tokenizer (tokenizer.json, tokenizer_config.json) is read from a qwen3_tokenizer/ or tokenizer/ folder next to it, or from its own folder.", group="flow", families=ZIMAGE)
    qwen3_max_token_length: int = param("int", 512, "Qwen3 tokens", "Z-Image: the prompt length in Qwen3 tokens, chat template included (512 as the Z-Image pipeline encodes prompts).", minimum=1, maximum=1024, group="flow", families=ZIMAGE)

    def check(self) -> None:
        """No cross-field checks: the family checks these with the model it has."""
