"""iLECO (instant LECO): move the concept of `original prompt` toward `target prompt`.

Each step draws pure-noise latents of ``image_size`` and a timestep, and trains

    loss = w(t) · ‖ε̂_net(z, t, c_orig) − sg[ε̂_base(z, t, c_target)]‖²

where ε̂_base is the same U-Net with the network unhooked (multiplier 0, no grad)
and w(t) the min-SNR (``train_snr_gamma`` > 0) and debiased-estimation weights. An
empty target prompt erases the concept: it moves toward what the model does for the
empty prompt.
Prompts are encoded once; the text encoder never trains here.

The loss kind and Huber schedule, min-SNR and debiased weights and zero-terminal SNR (through
those weights) apply; the noise options do not, since z is the input itself, not noise added
to data, and the target is a prediction, not that noise.
"""
from __future__ import annotations

import torch

from ..config.schema import TrainConfig
from ..config.params import ConfigError
from .base import PassInfo, PassSpec, StepContext, draw_timesteps, make_loss, repeat_rows, unet_predict


class IlecoMode:
    name = "iLECO"

    def passes(self, cfg: TrainConfig) -> list[PassSpec]:
        if not cfg.original_prompt.strip():
            raise ConfigError("original prompt", cfg.original_prompt,
                              "is empty; name the concept to erase or change")
        return [PassSpec(cfg)]

    def prepare(self, ctx: StepContext) -> PassInfo:
        """Encode both prompts once (together, so they pad to one length) and fix the latent shape."""
        cfg, bundle = ctx.cfg, ctx.bundle
        height, width = cfg.image_size  # as given: a portrait size trains portrait
        batch = cfg.train_batch_size
        both = ctx.encode([cfg.original_prompt, cfg.target_prompt])
        ctx.offload_text_encoders()
        factor = bundle.vae_factor
        ctx.state.update(
            orig=both[0].repeat(batch).to(ctx.device), targ=both[1].repeat(batch).to(ctx.device),
            shape=(batch, bundle.family.latent_channels(bundle), height // factor, width // factor),
            loss=make_loss(ctx), time_ids=repeat_rows(bundle.family.time_ids(
                (height, width), (0, 0), (height, width), device=ctx.device, dtype=ctx.dtype), batch),
        )
        return PassInfo(num_images=0, resolution=(width, height))

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor:
        st = ctx.state
        z = torch.randn(st["shape"], generator=ctx.generator, device=ctx.generator.device).to(ctx.device)
        timesteps = draw_timesteps(ctx, z)
        with torch.no_grad(), ctx.network.disabled():
            base = unet_predict(ctx, z, timesteps, st["targ"], st["time_ids"])
        pred = unet_predict(ctx, z, timesteps, st["orig"], st["time_ids"])
        loss, _ = st["loss"](pred.float(), base.float(), timesteps)
        return loss
