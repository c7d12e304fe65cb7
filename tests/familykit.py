"""Model files whose header alone tells their family (tiny tensors: only the keys matter), for the
tests of what the UI shows for each family."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# A BFL FLUX.1 transformer file (flux1-dev.safetensors) and an A1111 SD1 / SDXL checkpoint, by their keys.
KEYS = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"),
    "sd1": ("model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"),
    "sdxl": ("model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"),
}


def header_file(path: Path, family: str) -> Path:
    """A .safetensors file with `family`'s identifying keys and 1-element tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(1) for key in KEYS[family]}, str(path))
    return path
