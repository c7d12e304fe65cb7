"""FLOPs of one LoRA training step's U-Net work next to one VAE encode, on SD1.5 and on the bench model.

    python bench/flops.py

Latent caching saves one VAE encode per step, so what it is worth is the ratio
encode FLOPs / U-Net forward+backward FLOPs (frozen weights: the backward computes input
gradients only, as in LoRA training). Counted with torch.utils.flop_counter on the meta
device, so nothing is computed or allocated: SD1.5's real layout at 512 px, and each of the
benchmark's VAEs (bench/common.py VAES) with its U-Net at 256 px. The "scaled" VAE is the one
whose ratio matches SD1.5's, which makes its P2 the figure to read.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import PIXELS, VAES, bench_bundle  # noqa: E402


def unet_step_flops(unet: torch.nn.Module, latent: int, text_dim: int) -> int:
    """Forward + backward to the input of a frozen U-Net, batch 1, 77 tokens."""
    for p in unet.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 4, latent, latent, device="meta", requires_grad=True)
    cond = torch.randn(1, 77, text_dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device="meta"), cond).sample.sum().backward()
    return counter.get_total_flops()


def encode_flops(vae: torch.nn.Module, pixels: int) -> int:
    """One VAE encode of a pixels x pixels image, batch 1."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.randn(1, 3, pixels, pixels, device="meta"))
    return counter.get_total_flops()


def sd15() -> dict:
    """SD1.5's U-Net and VAE layouts (random, on the meta device) at 512 px."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
    return _row(unet_step_flops(unet, 64, 768), encode_flops(vae, 512))


def _row(unet: int, vae: int) -> dict:
    return {"unet_step_gflop": round(unet / 1e9, 1), "vae_encode_gflop": round(vae / 1e9, 1),
            "encode_over_step": round(vae / unet, 3)}


def main() -> dict:
    rows = {"sd15_512px": sd15()}
    for name in VAES:
        bundle = bench_bundle(vae=name)
        unet, vae = bundle.unet.to("meta"), bundle.vae.to("meta")
        rows[f"bench_{name}_vae_{PIXELS}px"] = _row(
            unet_step_flops(unet, PIXELS // 8, bundle.text_encoders[0].config.hidden_size), encode_flops(vae, PIXELS))
    for key, row in rows.items():
        print(f"{key:>24}: U-Net step {row['unet_step_gflop']:>8} GFLOP, encode {row['vae_encode_gflop']:>7} GFLOP,"
              f" encode/step {row['encode_over_step']}")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
