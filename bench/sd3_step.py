"""SD3.5 trainer step time versus a bare PyTorch loop doing the same math (P1's SD3 row).

    python bench/sd3_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random SD3.5-medium-architecture transformer built in code (diffusers'
SD3Transformer2DModel): 4 joint blocks, the first 2 with MMDiT-X's second attention (SD3.5 medium
has it in its first 13 of 24), 6 heads of 64 (384 wide), q/k RMS norm; 256 px images give 32x32
latents, 2x2 patches, 256 image tokens, next to 77 CLIP and 64 T5 tokens. The text encoders and the
autoencoder are the tests' tiny ones: with cached latents and captions they run before training only.

As bench/step.py and bench/flux_step.py, in one process and interleaved to cancel drift: bare,
trainer, bare, ..., bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA
mode, lierla, BASE off, cached latents and captions, weighting_scheme uniform, training_shift 3,
constant LR, AdamW, fp32, batch 1). The bare side (`sd3_step_loss`, timed by bench/familybench.py)
draws σ as sd-scripts does (u ~ U(0,1), shifted, t = floor(u'·1000), σ = t/1000), noises the
latents, runs the transformer at t on the cached conditioning, takes output·(−σ) + noisy input, the
MSE against x0, and steps AdamW on plain LoRA deltas (bench/bare.py) hooked into the same Linear
modules; `check_same_math` verifies that those deltas compute LyCORIS's output. A round's ratio is
the trainer's median ms/step over the mean of the bare medians just before and after it; P1 is the
median over the rounds. The last line of output is one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from bench.common import SEED  # noqa: E402
from bench.familybench import FamilyBench, entry_points, lierla_job, noised, shifted  # noqa: E402
from tests.flux_tiny import tiny_t5_tokenizer  # noqa: E402
from tests.sd3_tiny import tiny_sd3_parts  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.sd3_load import sd3_scheduler  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

SHIFT = 3.0  # training_shift
# SD3.5 medium has 24 joint blocks (MMDiT-X in 0-12), 24 heads of 64 (1536 wide); "bench" keeps its
# shape at 1/6 of the depth and 1/4 of the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"blocks": 4, "dual": (0, 1), "heads": 6, "head_dim": 64, "t5_tokens": 64, "pixels": 256},
    "tiny": {"blocks": 2, "dual": (0,), "heads": 2, "head_dim": 16, "t5_tokens": 8, "pixels": 64},
}
# The first line's model part: bench/familybench.py fills in SIZES', the JSON's and the counts' keys.
HEADING = ("SD3 transformer: {params:,} parameters ({joint_blocks} joint blocks, MMDiT-X attention in "
           "{dual_attention_blocks}, {heads} heads of {head_dim}), {pixels}x{pixels} px = {image_tokens} image + "
           "{text_tokens} text tokens")


def sd3_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """An SD3.5 bundle: the transformer of `size`, the tests' tiny CLIP-L/CLIP-G/T5/autoencoder; frozen, fp32."""
    parts = tiny_sd3_parts("5-medium", seed=seed)
    t5 = parts["t5xxl"]
    width = size["heads"] * size["head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=size["pixels"] // 8, patch_size=2, in_channels=16, num_layers=size["blocks"],
        attention_head_dim=size["head_dim"], num_attention_heads=size["heads"], joint_attention_dim=t5.config.d_model,
        caption_projection_dim=width, pooled_projection_dim=2 * parts["clip_l"].config.projection_dim,
        out_channels=16, pos_embed_max_size=size["pixels"] // 16, dual_attention_layers=size["dual"],
        qk_norm="rms_norm")
    bundle = ModelBundle(family="sd3", unet=transformer, vae=parts["vae"],
                         text_encoders=[parts["clip_l"], parts["clip_g"], t5],
                         tokenizers=[clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), tiny_t5_tokenizer()],
                         noise_scheduler=sd3_scheduler(), name="bench-sd3", source="memory",
                         extra={"sd3_variant": "5-medium"})
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def sd3_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """The common lierla job (bench/familybench.py); weighting uniform, training_shift 3; split_qkv on,
    so each of q, k, v has its own down as in the bare loop."""
    return TrainConfig(**lierla_job(data, steps, name, size), t5xxl_max_token_length=size["t5_tokens"],
                       weighting_scheme="uniform", training_shift=SHIFT, split_qkv=True)


def sd3_step_loss(transformer: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                  pooled: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand, as sd-scripts' sd3_train_network.py computes it."""
    b = latents.shape[0]

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        t = (shifted(torch.rand(b, generator=gen), SHIFT) * 1000).long().clamp(min=1).float()
        noisy = noised(latents, noise, t / 1000)
        sigma = (t / 1000).view(-1, 1, 1, 1)
        out = transformer(hidden_states=noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                          timestep=t, return_dict=False)[0]
        return F.mse_loss((out * (-sigma) + noisy).float(), latents)

    return step_loss


class SD3Bench(FamilyBench):
    """The SD3 model, job and bare step for bench/familybench.py."""

    label, title, model = "sd3", "SD3", "sd3.5-medium-architecture"
    sizes, heading, size_help = SIZES, HEADING, "the SD3.5-medium-shaped transformer"
    make_bundle, make_config = staticmethod(sd3_bundle), staticmethod(sd3_config)
    loss_fn = staticmethod(sd3_step_loss)

    def fields(self) -> tuple[dict, dict]:
        depth = {"joint_blocks": self.size["blocks"], "dual_attention_blocks": len(self.size["dual"])}
        return depth, {"text_tokens": 77 + self.size["t5_tokens"], "weighting_scheme": "uniform",
                       "training_shift": SHIFT}


parse_args, main = entry_points(SD3Bench, __doc__)

if __name__ == "__main__":
    main()
