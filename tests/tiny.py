"""Tiny random Stable Diffusion models with the real block layouts, built in code.

SD1/SD2 mirror the 4-level U-Net (so TrainTrain block IDs IN00-IN11/M00/OUT00-11
exist), SDXL mirrors its 3-level U-Net with the text_time embedding. Nothing is
downloaded; the tokenizer is the real CLIP BPE vocabulary.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.families.bundle import ModelBundle
from trainer.families.tokenizer import clip_tokenizer

TE_HIDDEN = 32


def tiny_text_config(hidden: int = TE_HIDDEN, layers: int = 2, act: str = "quick_gelu", projection: int | None = None) -> CLIPTextConfig:
    """heads = hidden // 64 rounded up to 1, the convention the single-file loader infers."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4,
        num_attention_heads=max(1, hidden // 64), num_hidden_layers=layers,
        max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def tiny_unet(family: str = "sd1") -> UNet2DConditionModel:
    if family == "sdxl":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
            cross_attention_dim=TE_HIDDEN * 2, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TE_HIDDEN, norm_num_groups=32,
        )
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 2, 4, 4) if family == "sd2" else 2,
        cross_attention_dim=TE_HIDDEN, use_linear_projection=family == "sd2", norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, sample_size=64,
    )


def tiny_scheduler(v_pred: bool = False) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_pred else "epsilon", clip_sample=False,
    )


def tiny_bundle(family: str = "sd1", seed: int = 0, v_pred: bool | None = None) -> ModelBundle:
    """A random tiny model of `family` (sd1, sd2 or sdxl) in eval mode, fp32, CPU."""
    torch.manual_seed(seed)
    v_pred = family == "sd2" if v_pred is None else v_pred
    if family == "sdxl":
        tes = [CLIPTextModel(tiny_text_config()),
               CLIPTextModelWithProjection(tiny_text_config(act="gelu"))]
        toks = [clip_tokenizer(), clip_tokenizer("!")]
    else:
        act = "gelu" if family == "sd2" else "quick_gelu"
        tes = [CLIPTextModel(tiny_text_config(act=act))]
        toks = [clip_tokenizer("!" if family == "sd2" else "<|endoftext|>")]
    bundle = ModelBundle(
        family=family, unet=tiny_unet(family), vae=tiny_vae(), text_encoders=tes, tokenizers=toks,
        noise_scheduler=tiny_scheduler(v_pred), v_pred=v_pred, name=f"tiny-{family}", source="memory",
    )
    for m in bundle.modules():
        m.eval().requires_grad_(False)
    return bundle
