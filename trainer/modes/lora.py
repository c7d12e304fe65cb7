"""LoRA mode: learn from a folder of images and captions."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from .base import PassInfo, PassSpec, StepContext, batch_time_ids, denoising_loss, make_loss, tag_frequency


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
        ctx.state["loss"] = make_loss(ctx)
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
        batch = next(ctx.state["batches"])
        latents = batch.latents.to(ctx.device, torch.float32, non_blocking=True)
        text = ctx.state["text"]
        cond = text.get(batch.captions) if text is not None else ctx.encode_grad(batch.captions)
        return denoising_loss(ctx, latents, cond, batch_time_ids(ctx, batch))
