"""FLUX.1 trainer step time versus a bare PyTorch loop doing the same math (P1's FLUX row).

    python bench/flux_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random FLUX.1-dev-architecture transformer built in code (diffusers'
FluxTransformer2DModel): 3 double + 6 single blocks, 6 heads of 64 (384 wide, 30.3M parameters),
FLUX.1's rotary split at that head size; 256 px images give 32x32 latents, packed 2x2 into 256
image tokens, next to 64 T5 tokens. The text encoders and the autoencoder are the tests' tiny
ones: with cached latents and captions they run before training only.

As bench/step.py, in one process and interleaved to cancel drift: bare, trainer, bare, ...,
bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA mode, lierla,
BASE off, cached latents and captions, timestep_sampling shift, model_prediction_type raw,
constant LR, AdamW, fp32, batch 1). The bare side (`flux_step_loss`, timed by
bench/familybench.py) packs the latents, draws σ = shift(sigmoid(N(0,1))), noises them, runs the
transformer on the cached T5/CLIP conditioning, unpacks, takes the MSE against noise - x0, and
steps AdamW on plain LoRA deltas (bench/bare.py) hooked into the same Linear modules;
`check_same_math` verifies that those deltas compute LyCORIS's output. A round's ratio is the
trainer's median ms/step over the mean of the bare medians just before and after it; P1 is the
median over the rounds.
The last line of output is one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from bench.common import SEED  # noqa: E402
from bench.familybench import FamilyBench, entry_points, lierla_job, noised, shifted  # noqa: E402
from tests.flux_tiny import tiny_flux_ae, tiny_t5, tiny_t5_tokenizer  # noqa: E402
from tests.tiny import tiny_text_config  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.flux import image_ids, pack, unpack  # noqa: E402
from trainer.families.flux_load import flux_scheduler  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

SHIFT = 3.1582        # discrete_flow_shift's default
GUIDANCE = 1.0        # guidance_scale's default (dev's guidance input)
# Transformer sizes. FLUX.1 has 19 double + 38 single blocks, 24 heads of 128 (3072 wide), rotary
# axes 16/56/56 (1/8 of the head, then halves); "bench" keeps that shape at 1/8 of the depth and
# 1/8 of the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"double": 3, "single": 6, "heads": 6, "head_dim": 64, "axes": (8, 28, 28), "t5_tokens": 64, "pixels": 256},
    "tiny": {"double": 1, "single": 1, "heads": 2, "head_dim": 32, "axes": (4, 14, 14), "t5_tokens": 8, "pixels": 64},
}
# The first line's model part: bench/familybench.py fills in SIZES', the JSON's and the counts' keys.
HEADING = ("FLUX transformer: {params:,} parameters ({double} double + {single} single blocks, {heads} heads of "
           "{head_dim}), {pixels}x{pixels} px = {image_tokens} image + {t5_tokens} T5 tokens")


def flux_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """A FLUX.1-dev bundle: the transformer of `size`, tiny CLIP-L/T5/autoencoder; frozen, fp32, eval mode."""
    torch.manual_seed(seed)
    clip, t5 = CLIPTextModel(tiny_text_config()), tiny_t5()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=size["double"], num_single_layers=size["single"],
        attention_head_dim=size["head_dim"], num_attention_heads=size["heads"],
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size,
        guidance_embeds=True, axes_dims_rope=size["axes"])
    bundle = ModelBundle(family="flux", unet=transformer, vae=tiny_flux_ae(), text_encoders=[clip, t5],
                         tokenizers=[clip_tokenizer("<|endoftext|>"), tiny_t5_tokenizer()],
                         noise_scheduler=flux_scheduler("dev"), name="bench-flux", source="memory")
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def flux_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """The common lierla job (bench/familybench.py); σ by shift, raw prediction; split_qkv on, so each
    of q, k, v has its own down as in the bare loop (shared downs do the same matmuls)."""
    return TrainConfig(**lierla_job(data, steps, name, size), t5xxl_max_token_length=size["t5_tokens"],
                       timestep_sampling="shift", discrete_flow_shift=SHIFT, model_prediction_type="raw",
                       guidance_scale=GUIDANCE, split_qkv=True)


def flux_step_loss(transformer: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                   pooled: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand: noise, σ = shift(sigmoid(N(0,1))), the noisy latents packed into
    tokens, the transformer on the cached conditioning, unpacked, MSE against noise - x0."""
    b, _, h, w = latents.shape
    img_ids = image_ids(h, w, latents.device, latents.dtype)  # the same each step: made once
    txt_ids = torch.zeros(hidden.shape[1], 3)
    guidance = torch.full((b,), GUIDANCE)

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        sigma = shifted(torch.sigmoid(torch.randn(b, generator=gen)), SHIFT)
        noisy = noised(latents, noise, sigma)
        out = transformer(hidden_states=pack(noisy), encoder_hidden_states=hidden, pooled_projections=pooled,
                          timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                          return_dict=False)[0]
        return F.mse_loss(unpack(out, h, w).float(), noise - latents)

    return step_loss


class FluxBench(FamilyBench):
    """The FLUX model, job and bare step for bench/familybench.py."""

    label, title, model = "flux", "FLUX", "flux1-dev-architecture"
    sizes, heading, size_help = SIZES, HEADING, "the 30.3M-parameter transformer"
    make_bundle, make_config = staticmethod(flux_bundle), staticmethod(flux_config)
    loss_fn = staticmethod(flux_step_loss)

    def fields(self) -> tuple[dict, dict]:
        return ({"double_blocks": self.size["double"], "single_blocks": self.size["single"]},
                {"t5_tokens": self.size["t5_tokens"], "timestep_sampling": "shift", "model_prediction_type": "raw"})


parse_args, main = entry_points(FluxBench, __doc__)

if __name__ == "__main__":
    main()
