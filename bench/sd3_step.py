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

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from bench import familybench  # noqa: E402
from bench.common import LEARNING_RATE, SEED  # noqa: E402
from bench.familybench import ALPHA, RANK, FamilyBench, run_family_bench  # noqa: E402
from tests.flux_tiny import tiny_t5_tokenizer  # noqa: E402
from tests.sd3_tiny import tiny_sd3_parts  # noqa: E402
from trainer.config.schema import BLOCK_IDS, TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.sd3 import SD3  # noqa: E402
from trainer.families.sd3_load import sd3_scheduler  # noqa: E402
from trainer.families.tokenizer import clip_tokenizer  # noqa: E402

SHIFT = 3.0  # training_shift
# SD3.5 medium has 24 joint blocks (MMDiT-X in 0-12), 24 heads of 64 (1536 wide); "bench" keeps its
# shape at 1/6 of the depth and 1/4 of the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"blocks": 4, "dual": (0, 1), "heads": 6, "head_dim": 64, "t5_tokens": 64, "pixels": 256},
    "tiny": {"blocks": 2, "dual": (0,), "heads": 2, "head_dim": 16, "t5_tokens": 8, "pixels": 64},
}


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
    """LoRA mode, lierla rank 16 / alpha 8, BASE off (cached captions), fp32, AdamW at a constant LR, batch 1;
    weighting uniform, training_shift 3, no min-SNR; split_qkv on, so each of q, k, v has its own down
    as in the bare loop."""
    px = size["pixels"]
    return TrainConfig(
        mode="LoRA", network_type="lierla", save_lora_name=name, lora_data_directory=str(data),
        image_size=[px, px], image_buckets_step=64, image_min_length=px, image_max_ratio=2.0,
        train_iterations=steps, train_batch_size=1, train_learning_rate=LEARNING_RATE,
        train_optimizer="AdamW", train_lr_scheduler="constant", network_rank=RANK, network_alpha=ALPHA,
        train_model_precision="fp32", train_lora_precision="fp32", save_precision="fp32",
        train_seed=SEED, use_gradient_checkpointing=False, train_snr_gamma=0.0,
        network_blocks=[b for b in BLOCK_IDS if b != "BASE"], t5xxl_max_token_length=size["t5_tokens"],
        weighting_scheme="uniform", training_shift=SHIFT, split_qkv=True)


def sd3_step_loss(transformer: torch.nn.Module, latents: torch.Tensor, hidden: torch.Tensor,
                  pooled: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand, as sd-scripts' sd3_train_network.py computes it."""
    b = latents.shape[0]

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        u = torch.rand(b, generator=gen)
        u = SHIFT * u / (1.0 + (SHIFT - 1.0) * u)
        t = (u * 1000).long().clamp(min=1).float()
        sigma = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        out = transformer(hidden_states=noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                          timestep=t, return_dict=False)[0]
        return F.mse_loss((out * (-sigma) + noisy).float(), latents)

    return step_loss


class SD3Bench(FamilyBench):
    """The SD3 model, job and bare step for bench/familybench.py."""

    label, title, model, sizes, family_cls = "sd3", "SD3", "sd3.5-medium-architecture", SIZES, SD3

    def make_bundle(self, size: dict) -> ModelBundle:
        return sd3_bundle(size)

    def make_config(self, data: Path, steps: int, name: str, size: dict) -> TrainConfig:
        return sd3_config(data, steps, name, size)

    def take_conditioning(self, cond) -> None:
        self.hidden, self.pooled = cond.hidden.detach(), cond.pooled.detach()

    def step_loss(self, unet: torch.nn.Module) -> Callable[[torch.Generator], torch.Tensor]:
        return sd3_step_loss(unet, self.latents, self.hidden, self.pooled)

    def describe(self, model_params: int, tokens: int) -> str:
        size = self.size
        return (f"SD3 transformer: {model_params:,} parameters ({size['blocks']} joint blocks, MMDiT-X attention in "
                f"{len(size['dual'])}, {size['heads']} heads of {size['head_dim']}), {size['pixels']}x{size['pixels']} px = "
                f"{tokens} image + {77 + size['t5_tokens']} text tokens")

    def fields(self) -> tuple[dict, dict]:
        size = self.size
        return ({"joint_blocks": size["blocks"], "dual_attention_blocks": len(size["dual"])},
                {"text_tokens": 77 + size["t5_tokens"], "weighting_scheme": "uniform", "training_shift": SHIFT})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return familybench.parse_args(__doc__, SIZES, "the SD3.5-medium-shaped transformer", argv)


def main(argv: list[str] | None = None) -> dict:
    return run_family_bench(SD3Bench, parse_args(argv))


if __name__ == "__main__":
    main()
