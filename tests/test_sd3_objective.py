"""SD3's objective as sd-scripts' sd3_train_network.py computes it, and its prompts as diffusers'
StableDiffusion3Pipeline encodes them."""
from __future__ import annotations

import pytest
import torch

from trainer.config.schema import TrainConfig
from trainer.families.sd3 import SD3
from trainer.families.textenc import Cond

from tests.sd3_tiny import tiny_sd3_bundle


@pytest.mark.parametrize("scheme,shift", [("uniform", 1.0), ("uniform", 3.0), ("logit_normal", 1.0), ("mode", 2.0)])
def test_timesteps_are_sd_scripts_draw(scheme, shift):
    """u from the density, u' = s·u/(1 + (s−1)·u), t = floor(u'·1000), σ = t/1000 (t of 0 raised to 1)."""
    cfg = TrainConfig(weighting_scheme=scheme, training_shift=shift, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    got = SD3().sample_timesteps(cfg, 256, (256, 16, 8, 8), generator=torch.Generator().manual_seed(7),
                                 device=torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(256, generator=g))
    else:
        u = torch.rand(256, generator=g)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
    u = u * shift / (1 + (shift - 1) * u)
    want = (u * 1000).long().clamp(min=1).float() / 1000
    assert torch.equal(got, want)


class Recorder(torch.nn.Module):
    """A stand-in transformer: records its inputs, returns a fixed output."""

    def __init__(self, config):
        super().__init__()
        self.config, self.seen = config, {}
        self.out = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))

    def forward(self, **kwargs):
        self.seen = kwargs
        return (self.out,)


def test_the_prediction_is_x0_from_the_output_and_the_loss_weighting():
    bundle = tiny_sd3_bundle()
    bundle.unet = Recorder(bundle.unet.config)
    family, sigma = SD3(), torch.tensor([0.25, 0.8])
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    noisy = family.noisy_input(None, x0, noise, sigma)
    assert torch.allclose(noisy, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    cond = Cond(torch.randn(2, 5, 32), torch.randn(2, 32))
    pred = family.denoise(bundle, noisy, sigma, cond, None, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.allclose(bundle.unet.seen["timestep"], sigma * 1000)  # the transformer takes t, not σ
    assert torch.allclose(pred, bundle.unet.out * (-sigma.view(-1, 1, 1, 1)) + noisy)
    assert torch.equal(family.target(None, x0, noise, sigma, False), x0)
    loss = family.make_loss(TrainConfig(weighting_scheme="sigma_sqrt"), None, v_pred=False, device=torch.device("cpu"))
    _, per_sample = loss(pred, x0, sigma)
    plain = ((pred - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample, plain * sigma ** -2.0)


@pytest.mark.parametrize("t5", [True, False])
def test_prompts_are_encoded_as_diffusers_sd3_pipeline_encodes_them(t5):
    bundle = tiny_sd3_bundle(t5=t5)
    family = bundle.family
    length = 12 if t5 else 77  # without T5: 77 zero tokens (sd-scripts; diffusers 0.31 always, 0.42 when asked)
    bundle.extra["sd3"] = {**family._settings(bundle), "t5_length": length}
    ours = family.encode_prompts(bundle, ["a photo of a cat", "a dog"], clip_skip=1, grad=False)
    pipe = family.pipeline(bundle, family.sampling_scheduler(bundle.noise_scheduler, "euler"))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a cat", "a dog"], None, None,
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
    assert ours.hidden.shape == embeds.shape == (2, 77 + length, 32)
    assert torch.allclose(ours.hidden, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert bool(ours.hidden[:, 77:].any()) == t5


@pytest.mark.parametrize("t5", [True, False])
def test_samples_render_through_diffusers_sd3_pipeline_from_cached_prompts(t5):
    bundle = tiny_sd3_bundle(t5=t5)
    family = bundle.family
    cond = family.encode_prompts(bundle, ["a cat", ""], clip_skip=1, grad=False)
    pipe = family.pipeline(bundle, family.sampling_scheduler(bundle.noise_scheduler, "euler"))
    assert pipe.transformer is bundle.unet and (pipe.text_encoder_3 is None) is (not t5)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent", guidance_scale=5.0)
    with torch.no_grad():
        a = pipe(**family.pipeline_embeds(cond), generator=torch.Generator().manual_seed(0), **kwargs).images
        b = pipe(prompt="a cat", negative_prompt="", generator=torch.Generator().manual_seed(0),
                 max_sequence_length=256 if t5 else 77, **kwargs).images
    assert family.pipeline_latents(a, 64, 64).shape == (1, 16, 8, 8)
    assert torch.allclose(a, b, atol=1e-5)  # the cached embeddings are the pipeline's own
