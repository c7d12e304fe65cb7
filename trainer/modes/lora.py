"""LoRA mode: learn from a folder of images and captions."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from ..losses import DiffusionLoss, noise_like, sample_timesteps, training_target
from .base import PassInfo, PassSpec, StepContext, tag_frequency, unet_predict


class LoraMode:
    name = "LoRA"

    def passes(self, cfg: TrainConfig) -> list[PassSpec]:
        return [PassSpec(cfg)]

    def prepare(self, ctx: StepContext) -> PassInfo:
        """Scan, bucket and cache latents (and captions unless the text encoder trains)."""
        from ..data import BucketBatches, TextCache, build_latent_dataset, scan_images

        cfg, bundle = ctx.cfg, ctx.bundle
        items = scan_images(cfg.lora_data_directory, trigger=cfg.lora_trigger_word,
                            use_filename=cfg.image_use_filename_as_tag)
        dataset = build_latent_dataset(
            items, cfg, bundle, device=ctx.device, multiple=bundle.latent_multiple,
            progress=lambda done, total: ctx.report("caching latents", done, total),
            should_stop=ctx.should_stop)
        ctx.state["batches"] = iter(BucketBatches(dataset, cfg.train_batch_size, ctx.seed, repeats=cfg.image_num_multiply))
        ctx.state["text"] = None
        ctx.state["loss"] = DiffusionLoss(cfg.train_loss_function, bundle.noise_scheduler.alphas_cumprod,
                                          snr_gamma=cfg.train_snr_gamma, v_pred=bundle.v_pred, device=ctx.device)
        if not ctx.network.trains_text_encoder:
            text = TextCache(ctx.encode)
            text.warm(dataset.captions, lambda done, total: ctx.report("encoding captions", done, total),
                      ctx.should_stop)
            ctx.state["text"] = text
            ctx.offload_text_encoders()
        left_out = set(dataset.skipped) | set(dataset.not_upscaled)
        used = [item.caption for item in items if item.path not in left_out]
        return PassInfo(num_images=dataset.images, tag_frequency=tag_frequency(used),
                        resolution=(cfg.image_size[1], cfg.image_size[0]))

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor:
        from ..textenc import sdxl_time_ids

        cfg = ctx.cfg
        batch = next(ctx.state["batches"])
        latents = batch.latents.to(ctx.device, torch.float32, non_blocking=True)
        noise = noise_like(latents, offset=cfg.noise_offset, generator=ctx.generator)
        timesteps = sample_timesteps(latents.shape[0], cfg.train_min_timesteps, cfg.train_max_timesteps,
                                     same_in_batch=cfg.train_fixed_timsteps_in_batch,
                                     generator=ctx.generator, device=ctx.device)
        noisy = ctx.bundle.noise_scheduler.add_noise(latents, noise, timesteps)
        text = ctx.state["text"]
        cond = text.get(batch.captions) if text is not None else ctx.encode_grad(batch.captions)
        time_ids = None
        if ctx.bundle.is_sdxl:
            time_ids = sdxl_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes,
                                     device=ctx.device, dtype=ctx.dtype)
        pred = unet_predict(ctx, noisy, timesteps, cond, time_ids)
        target = training_target(ctx.bundle.noise_scheduler, latents, noise, timesteps, ctx.bundle.v_pred)
        loss, _ = ctx.state["loss"](pred.float(), target, timesteps)
        return loss
