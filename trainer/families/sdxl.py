"""SDXL: 3-level U-Net with size conditioning (time_ids) and pooled text embeddings, CLIP-L and
OpenCLIP-G at their penultimate layers side by side; LoRA files in the original-model layout."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .sd import UNetFamily

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .textenc import Cond


class SDXL(UNetFamily):
    name = "sdxl"
    label = "SDXL"
    text_encoder_count = 2
    pad_tokens = ("<|endoftext|>", "!")
    vae_scale = 0.13025
    model_version = "sdxl_base_v1-0"
    modelspec_arch = "stable-diffusion-xl-v1-base"
    # sd-scripts names SDXL LoRAs after Stability's implementation
    implementation = "https://github.com/Stability-AI/generative-models"
    # A1111 maps diffusers-named SDXL keys with SD1's layout, so files use the ldm names
    ldm_unet_keys = True
    unet_levels = 3
    host_clip_skip_limit = 2  # Forge runs both encoders at the penultimate layer

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int,
                       grad: bool) -> Cond:
        from .textenc import encode_dual

        return encode_dual(bundle, prompts)

    def time_ids(self, original_hw: Any, crop_top_left: Any, target_hw: Any, *,
                 device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
        from .textenc import sdxl_time_ids

        return sdxl_time_ids(original_hw, crop_top_left, target_hw, device=device, dtype=dtype)

    def model_kwargs(self, cond: Cond, time_ids: torch.Tensor | None, device: torch.device,
                     dtype: torch.dtype) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": cond.pooled.to(device, dtype), "time_ids": time_ids}}

    def pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        te1, te2 = bundle.text_encoders
        tok1, tok2 = bundle.tokenizers
        return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=bundle.unet, scheduler=scheduler,
                                         add_watermarker=False)

    def pipeline_embeds(self, cond: Cond) -> dict[str, Any]:
        return {**super().pipeline_embeds(cond), "pooled_prompt_embeds": cond.pooled[:1],
                "negative_pooled_prompt_embeds": cond.pooled[1:]}
