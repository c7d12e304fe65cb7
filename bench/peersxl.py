"""The SDXL-layout work of bench/peers.py (`--family sdxl`): its model and the peers' command lines.

One random-weight model with SDXL's layout at a CPU size, saved once as a diffusers folder
that all three programs load: a 3-level U-Net (64-128-256 channels, heads of 64 channels,
SDXL's transformer depths 1-2-10, text_time embedding), two CLIP text encoders (768 and
1280 wide, so that the cross-attention context is SDXL's 2048 and the pooled + size vector
SDXL's 2816; the first has CLIP-L's 12 layers, since kohya reads its layer 11 by number, the
second 2), and the small bench VAE with SDXL's latent scale.

kohya's sdxl_train_network.py turns the diffusers U-Net into its own class, which hard-codes
SDXL's sizes as module constants and literals. Depths (2, 10), context (2048) and the
text_time vector (2816) are kept at SDXL's own values here so that only its base width has
to change; bench/peerrun.py's `--sdxl-unet-channels` sets that (and the time-embedding
width that follows from it) in the peer's process before the model is built.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.common import LEARNING_RATE, RANK, SEED, VAES

XL_CHANNELS = (64, 128, 256)
XL_DEPTHS = (1, 2, 10)  # SDXL's; the first level has no attention
HEAD_DIM = 64  # kohya's SDXL U-Net: heads = channels // 64
TEXT_DIMS = (768, 1280)  # CLIP-L and OpenCLIP-G widths: context 768 + 1280 = 2048
TEXT_LAYERS = (12, 2)  # CLIP-L's 12 (kohya reads its layer 11 by number); the wide one kept short
TIME_ID_DIM = 256  # per size/crop number; 6 x 256 + 1280 pooled = 2816
CONTEXT_DIM, ADM_DIM = sum(TEXT_DIMS), 6 * TIME_ID_DIM + TEXT_DIMS[1]
XL_PIXELS = 128
XL_SCALE = 0.13025
# kohya loads both tokenizers by hub name unless a cache folder holds them under these names
KOHYA_TOKENIZERS = {"tokenizer": "openai_clip-vit-large-patch14",
                    "tokenizer_2": "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"}
XL_KOHYA_SCRIPT = "sdxl_train_network.py"
XL_EXAMPLE = Path("examples/text_to_image/train_text_to_image_lora_sdxl.py")


def sdxl_unet(seed: int = SEED):
    """SDXL's U-Net layout at 1/5 of its width (64-128-256 channels)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=XL_PIXELS // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=XL_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=XL_DEPTHS,
        attention_head_dim=tuple(c // HEAD_DIM for c in XL_CHANNELS),  # diffusers reads it as heads per level
        cross_attention_dim=CONTEXT_DIM, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
        projection_class_embeddings_input_dim=ADM_DIM)


def sdxl_text_encoders(seed: int = SEED) -> list:
    """A CLIP-L-like (quick_gelu) and an OpenCLIP-G-like (gelu, projection) encoder, TEXT_LAYERS deep."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = []
    kinds = ((TEXT_DIMS[0], TEXT_LAYERS[0], "quick_gelu", CLIPTextModel),
             (TEXT_DIMS[1], TEXT_LAYERS[1], "gelu", CLIPTextModelWithProjection))
    for i, (dim, layers, act, cls) in enumerate(kinds):
        torch.manual_seed(seed + 1 + i)
        models.append(cls(CLIPTextConfig(
            vocab_size=49408, hidden_size=dim, intermediate_size=dim * 4, num_attention_heads=dim // 64,
            num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act, projection_dim=dim,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)))
    return models


def sdxl_vae(seed: int = SEED):
    """The small bench VAE with SDXL's latent scale."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    channels, layers, groups = VAES["small"]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=channels, layers_per_block=layers,
        norm_num_groups=groups, sample_size=XL_PIXELS, scaling_factor=XL_SCALE)


def write_sdxl_model(folder: Path) -> dict:
    """The SDXL-layout model as a diffusers folder (unet, vae, two encoders and tokenizers, scheduler)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from trainer.families.tokenizer import clip_tokenizer

    unet, vae, (te1, te2) = sdxl_unet(), sdxl_vae(), sdxl_text_encoders()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer("!"), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"family": "sdxl", "unet_params": count(unet), "text_encoder_params": [count(te1), count(te2)],
            "vae_params": count(vae), "unet_channels": list(XL_CHANNELS), "transformer_depths": list(XL_DEPTHS),
            "text_dims": list(TEXT_DIMS), "text_layers": list(TEXT_LAYERS)}


def write_sdxl_tokenizer_cache(model: Path, cache: Path) -> Path:
    """Both tokenizers where kohya's --tokenizer_cache_dir looks for them."""
    for sub, name in KOHYA_TOKENIZERS.items():
        shutil.copytree(model / sub, cache / name, dirs_exist_ok=True)
    return cache


def kohya_sdxl_cmd(py: str, runner: Path, checkout: Path, work: Path, model: Path, data: Path,
                   steps: int) -> list[str]:
    """sdxl_train_network.py on the model, LoRA on the transformer blocks, both caches on."""
    return [py, str(runner), "--out", "{out}", "--sys-path", str(checkout), "--torchvision-stub",
            "--sdxl-unet-channels", str(XL_CHANNELS[0]), "--script", str(checkout / XL_KOHYA_SCRIPT), "--",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", f"{XL_PIXELS},{XL_PIXELS}", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--network_module", "networks.lora", "--network_dim", str(RANK),
            "--network_alpha", "8", "--network_train_unet_only", "--optimizer_type", "AdamW",
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--mixed_precision", "no",
            "--save_precision", "float", "--cache_latents", "--cache_text_encoder_outputs", "--sdpa",
            "--seed", str(SEED), "--max_data_loader_n_workers", "0",
            "--tokenizer_cache_dir", str(work / "tokenizers"), "--output_dir", str(work / "out-kohya"),
            "--output_name", "peers"]


def diffusers_sdxl_cmd(py: str, runner: Path, checkout: Path, work: Path, model: Path, data: Path,
                       steps: int, targets: str) -> list[str]:
    """The diffusers SDXL LoRA example with its LoraConfig widened to `targets`."""
    return [py, str(runner), "--out", "{out}", "--torchvision-stub", "--peft-targets", targets,
            "--script", str(checkout / XL_EXAMPLE), "--",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_column", "text", "--resolution", str(XL_PIXELS), "--center_crop",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", str(LEARNING_RATE),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", str(RANK),
            "--mixed_precision", "no", "--seed", str(SEED), "--dataloader_num_workers", "0",
            "--output_dir", str(work / "out-diffusers")]
