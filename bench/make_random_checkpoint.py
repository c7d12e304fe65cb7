"""A random-weight single-file checkpoint with a family's real architecture and sizes, for trying a WebUI.

    python bench/make_random_checkpoint.py FAMILY DIFFUSERS_CONFIG_DIR OUT.safetensors [--seed 0]

FAMILY is sd1, sd2 or sdxl; DIFFUSERS_CONFIG_DIR holds the family's diffusers configs (unet/, vae/,
text_encoder/ and for SDXL text_encoder_2/ with config.json files, e.g. the ones a WebUI ships for
its own loader). The models are built from those configs with random weights, laid out as an
original (ldm) checkpoint by the tests' exporter, and written in fp16. No weights are downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.ldm_export import export_ldm
    from trainer.families.bundle import ModelBundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("configs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    started = time.time()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(a.configs / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(a.configs / "vae"))
    tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(a.configs / "text_encoder"))]
    if a.family == "sdxl":
        tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(a.configs / "text_encoder_2")))
    bundle = ModelBundle(family=a.family, unet=unet, vae=vae, text_encoders=tes, tokenizers=[None] * len(tes),
                         noise_scheduler=None)
    with torch.no_grad():
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in export_ldm(bundle).items()}
    del bundle, unet, vae, tes
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(a.out))
    values = sum(v.numel() for v in sd.values())
    print(f"wrote {a.out}: {len(sd)} tensors, {values / 1e6:.0f}M values, {a.out.stat().st_size / 2**30:.2f} GiB, "
          f"{time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
