"""Z-Image trains in the convention diffusers' own ZImagePipeline samples in: the same transformer
timestep for a noise level σ (direction and scale), the same sign of the velocity, the same
prompt embeddings, and latents and patching as the pipeline makes them."""
from __future__ import annotations

import pytest
import torch

from trainer.families import flow
from trainer.families.zimage import ZImage, caption_list, model_timestep

from tests.zimage_tiny import tiny_zimage_bundle

pytestmark = pytest.mark.needs_zimage
CPU = torch.device("cpu")


def pipeline_of(bundle, shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    return bundle.family.pipeline(bundle, scheduler)


def record_transformer(bundle, calls: list, answer=None):
    """Wrap the transformer's forward: record (frames, t, captions); answer(frames) replaces its output."""
    model = bundle.unet
    original = model.forward

    def forward(x, t, cap_feats, *args, **kwargs):
        calls.append(([f.clone() for f in x], t.clone(), [c.clone() for c in cap_feats]))
        if answer is not None:
            return (answer(x),)
        return original(x, t, cap_feats, *args, **kwargs)

    model.forward = forward
    return model


@pytest.mark.parametrize("sigma", [0.9, 0.5, 0.2])
def test_the_transformer_sees_the_same_t_in_training_as_in_the_pipeline(sigma):
    """One pipeline step from σ: the t it passes equals the family's t for σ (1 − σ, not σ nor σ·1000)."""
    bundle = tiny_zimage_bundle()
    family = bundle.family
    cond = family.encode_prompts(bundle, ["a photo of a cat"], clip_skip=1, grad=False)
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    noisy = family.noisy_input(None, x0, noise, torch.tensor([sigma]))
    seen_pipe: list = []
    record_transformer(bundle, seen_pipe)
    pipe = pipeline_of(bundle)
    pipe(prompt_embeds=caption_list(cond), guidance_scale=0.0, sigmas=[sigma], num_inference_steps=1,
         height=64, width=64, latents=noisy.clone(), output_type="latent")
    (frames_p, t_pipe, caps_p), = seen_pipe
    seen_train: list = []
    record_transformer(bundle, seen_train)
    family.denoise(bundle, noisy, torch.tensor([sigma]), cond, None, device=CPU, dtype=torch.float32)
    (frames_t, t_train, caps_t), = seen_train
    assert torch.allclose(t_train, t_pipe, atol=1e-6), (t_train, t_pipe)
    assert t_pipe.item() == pytest.approx(1.0 - sigma, abs=1e-6)  # larger σ (more noise): smaller t
    assert model_timestep(torch.tensor([sigma])).item() == pytest.approx(1.0 - sigma, abs=1e-6)
    # the same input frames [C, 1, H/8, W/8] (the transformer patches 2×2 itself) and captions
    assert frames_t[0].shape == (16, 1, 8, 8) and torch.allclose(frames_t[0], frames_p[0])
    assert torch.allclose(caps_t[0], caps_p[0])


def test_a_perfect_prediction_in_training_takes_the_pipeline_to_the_clean_latent():
    """A transformer whose output gives the training target exactly (the family's prediction = noise − x0)
    is stepped by the pipeline from σ to 0 onto x0: the sign and scale of the velocity agree."""
    bundle = tiny_zimage_bundle()
    family = bundle.family
    sigma = 0.7
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    noisy = family.noisy_input(None, x0, noise, torch.tensor([sigma]))
    family.prepare(bundle, _raw(), CPU)  # raw: the transformer's velocity as the prediction
    oracle = -(noise - x0)[0].unsqueeze(1)  # what the transformer must output for a perfect velocity
    record_transformer(bundle, [], answer=lambda x: [oracle.clone() for _ in x])
    cond = family.encode_prompts(bundle, ["a cat"], clip_skip=1, grad=False)
    pred = family.denoise(bundle, noisy, torch.tensor([sigma]), cond, None, device=CPU, dtype=torch.float32)
    assert torch.allclose(pred, family.target(None, x0, noise, torch.tensor([sigma]), False), atol=1e-6)
    out = pipeline_of(bundle)(prompt_embeds=caption_list(cond), guidance_scale=0.0, sigmas=[sigma],
                              num_inference_steps=1, height=64, width=64, latents=noisy.clone(),
                              output_type="latent").images
    assert torch.allclose(out, x0, atol=1e-5)


def _raw():
    from trainer.config.schema import TrainConfig

    return TrainConfig(model_prediction_type="raw", qwen3_max_token_length=24)


def test_prompts_are_encoded_as_the_pipeline_encodes_them():
    bundle = tiny_zimage_bundle()
    family = bundle.family
    family.prepare(bundle, _raw(), CPU)
    prompts = ["a photo of a cat sitting on the table", "", "sks person"]
    ours = caption_list(family.encode_prompts(bundle, prompts, clip_skip=1, grad=False))
    theirs = pipeline_of(bundle)._encode_prompt(list(prompts), device=CPU, max_sequence_length=24)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    assert ours[0].shape[0] == 14  # 5 template tokens + 9 words: padding cut, as the pipeline cuts it
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_without_its_template_the_tokenizer_gets_qwen3s():
    from trainer.families.zimage import chat_prompts

    from tests.zimage_tiny import tiny_qwen_tokenizer

    with_template, without = tiny_qwen_tokenizer(), tiny_qwen_tokenizer(template=False)
    assert chat_prompts(without, ["a cat"]) == chat_prompts(with_template, ["a cat"]) == [
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"]


def test_latents_are_scaled_and_shifted_by_the_vae_config_as_the_pipeline_decodes_them():
    bundle = tiny_zimage_bundle()
    assert (bundle.vae_scale, bundle.vae_shift) == (bundle.vae.config.scaling_factor, bundle.vae.config.shift_factor)
    assert bundle.vae_shift != 0.0
    assert ZImage().latent_multiple(bundle) == 16  # 8× VAE, then 2×2 patches: the pipeline's vae_scale_factor·2
    assert pipeline_of(bundle).vae_scale_factor * 2 == 16


def test_sigma_sampling_is_flux_s():
    from trainer.config.schema import TrainConfig

    cfg = TrainConfig(timestep_sampling="shift", discrete_flow_shift=3.0)
    ours = ZImage().sample_timesteps(cfg, 6, (6, 16, 64, 64), generator=torch.Generator().manual_seed(0), device=CPU)
    expected = flow.shift_sigma(torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(0))), 3.0)
    assert torch.allclose(ours, expected)


def test_samples_render_through_the_zimage_pipeline():
    import numpy as np

    from trainer.training.samples import render_samples

    bundle = tiny_zimage_bundle()
    bundle.family.prepare(bundle, _raw(), CPU)
    first = render_samples(bundle, ["a photo of a cat"], negative_prompt="blue", steps=2, size=(64, 64),
                           seed=3, guidance=4.0, device=CPU)
    again = render_samples(bundle, ["a photo of a cat"], negative_prompt="blue", steps=2, size=(64, 64),
                           seed=3, guidance=4.0, device=CPU)
    other = render_samples(bundle, ["a photo of a cat"], negative_prompt="blue", steps=2, size=(64, 64),
                           seed=4, guidance=4.0, device=CPU)
    assert first[0].size == (64, 64)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
