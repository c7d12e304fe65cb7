"""Z-Image trainer step time versus a bare PyTorch loop doing the same math (P1's Z-Image row).

    python bench/zimage_step.py [--quick] [--steps N] [--warmup N] [--rounds R] [--threads N] [--size bench|tiny]

The model is a random Z-Image-architecture transformer built in code (diffusers'
ZImageTransformer2DModel): 4 layers, 1 noise and 1 context refiner, 3 heads of 128 (384 wide),
Z-Image's rotary split of its 128-wide heads; 256 px images give 32x32 latents, patched 2x2 by the
transformer into 256 image tokens, next to the prompt's Qwen3 tokens. The Qwen3 text encoder and
the autoencoder are the tests' tiny ones: with cached latents and captions they run before
training only. Needs diffusers >= 0.36.

As bench/flux_step.py, in one process and interleaved to cancel drift: bare, trainer, bare, ...,
bare. The trainer side is the real engine (`Trainer(cfg, host).run()`, LoRA mode, lierla, BASE off,
cached latents and captions, timestep_sampling shift 3.0, model_prediction_type raw, constant LR,
AdamW, fp32, batch 1). The bare side (`zimage_step_loss`, timed by bench/familybench.py) draws
σ = shift(sigmoid(N(0,1))), noises the latents, runs the transformer on [C, 1, H, W] frames at t = 1 − σ
with the cached caption embeddings, negates its output, takes the MSE against noise − x0, and steps
AdamW on plain LoRA deltas (bench/bare.py) hooked into the same Linear modules; `check_same_math`
verifies that those deltas compute LyCORIS's output. A round's ratio is the trainer's median ms/step
over the mean of the bare medians just before and after it; P1 is the median over the rounds. The
last line of output is one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import ZImageTransformer2DModel  # noqa: E402

from bench.common import SEED  # noqa: E402
from bench.familybench import FamilyBench, entry_points, lierla_job, noised, shifted  # noqa: E402
from tests.flux_tiny import tiny_flux_ae  # noqa: E402
from tests.zimage_tiny import tiny_qwen3, tiny_qwen_tokenizer  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.families.bundle import ModelBundle  # noqa: E402
from trainer.families.zimage import caption_list  # noqa: E402
from trainer.families.zimage_load import SCHEDULER, scheduler  # noqa: E402

SHIFT = SCHEDULER["shift"]  # Z-Image's scheduler shift (3.0), as the preset trains with
QWEN3_TOKENS = 32           # qwen3_max_token_length: the padding is cut, the prompt's tokens stay
# Transformer sizes. Z-Image has 30 layers, 2 noise and 2 context refiners, 30 heads of 128 (3840
# wide), rotary axes 32/48/48; "bench" keeps the head shape at about 1/8 of the depth and 1/10 of
# the width, "tiny" is for the test of the bench itself.
SIZES = {
    "bench": {"layers": 4, "refiners": 1, "heads": 3, "head_dim": 128, "axes": [32, 48, 48], "pixels": 256},
    "tiny": {"layers": 1, "refiners": 1, "heads": 2, "head_dim": 32, "axes": [8, 12, 12], "pixels": 64},
}
# The first line's model part: bench/familybench.py fills in SIZES', the JSON's and the counts' keys.
HEADING = ("Z-Image transformer: {params:,} parameters ({layers} layers + {refiners} noise and context refiners, "
           "{heads} heads of {head_dim}), {pixels}x{pixels} px = {image_tokens} image + {caption_tokens} caption "
           "tokens")


def zimage_bundle(size: dict, seed: int = SEED) -> ModelBundle:
    """A Z-Image bundle: the transformer of `size`, tiny Qwen3/autoencoder; frozen, fp32, eval mode."""
    torch.manual_seed(seed)
    qwen3 = tiny_qwen3()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=size["heads"] * size["head_dim"],
        n_layers=size["layers"], n_refiner_layers=size["refiners"], n_heads=size["heads"], n_kv_heads=size["heads"],
        cap_feat_dim=qwen3.config.hidden_size, axes_dims=size["axes"], axes_lens=[256, 128, 128])
    bundle = ModelBundle(family="zimage", unet=transformer, vae=tiny_flux_ae(), text_encoders=[qwen3],
                         tokenizers=[tiny_qwen_tokenizer()], noise_scheduler=scheduler(), name="bench-zimage",
                         source="memory")
    for module in bundle.modules():
        module.eval().requires_grad_(False)
    return bundle


def zimage_config(data: Path, steps: int, name: str, size: dict) -> TrainConfig:
    """The common lierla job (bench/familybench.py); σ by shift 3.0, raw prediction."""
    return TrainConfig(**lierla_job(data, steps, name, size), qwen3_max_token_length=QWEN3_TOKENS,
                       timestep_sampling="shift", discrete_flow_shift=SHIFT, model_prediction_type="raw")


def zimage_step_loss(transformer: torch.nn.Module, latents: torch.Tensor,
                     captions: list[torch.Tensor]) -> Callable[[torch.Generator], torch.Tensor]:
    """One step's loss by hand: noise, σ = shift(sigmoid(N(0,1))), the noisy latents as [C, 1, H, W]
    frames at t = 1 − σ, the transformer on the cached captions, its output negated, MSE against noise − x0."""
    b = latents.shape[0]

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        sigma = shifted(torch.sigmoid(torch.randn(b, generator=gen)), SHIFT)
        noisy = noised(latents, noise, sigma)
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), 1.0 - sigma, captions, return_dict=False)[0]
        return F.mse_loss(-torch.stack(out).squeeze(2).float(), noise - latents)

    return step_loss


class ZImageBench(FamilyBench):
    """The Z-Image model, job and bare step for bench/familybench.py."""

    label, title, model = "zimage", "Z-Image", "z-image-architecture"
    sizes, heading, size_help = SIZES, HEADING, "the 4-layer, 384-wide transformer"
    make_bundle, make_config = staticmethod(zimage_bundle), staticmethod(zimage_config)
    loss_fn = staticmethod(zimage_step_loss)

    def bare_inputs(self, cond) -> tuple:
        return ([c.detach() for c in caption_list(cond)],)  # one [tokens, width] tensor per image

    def fields(self) -> tuple[dict, dict]:
        tokens = int(self.inputs[0][0].shape[0])
        return ({"layers": self.size["layers"], "refiners": self.size["refiners"]},
                {"caption_tokens": tokens, "timestep_sampling": "shift", "model_prediction_type": "raw"})


parse_args, main = entry_points(ZImageBench, __doc__)

if __name__ == "__main__":
    main()
