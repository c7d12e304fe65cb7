"""LoRA mode: learn from a folder of images and captions."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..config.schema import TrainConfig
from .base import PassInfo, PassSpec, StepContext, batch_time_ids, denoising_loss, make_loss, tag_frequency

if TYPE_CHECKING:
    from ..data import CaptionTricks, TextCache

log = logging.getLogger(__name__)


class LoraMode:
    name = "LoRA"

    def passes(self, cfg: TrainConfig) -> list[PassSpec]:
        return [PassSpec(cfg)]

    def prepare(self, ctx: StepContext) -> PassInfo:
        """Scan, bucket and cache latents (and captions unless the text encoder trains)."""
        from ..data import BucketBatches, CaptionTricks, build_latent_dataset, scan_images

        cfg, bundle = ctx.cfg, ctx.bundle
        items = scan_images(cfg.lora_data_directory, trigger=cfg.lora_trigger_word,
                            use_filename=cfg.image_use_filename_as_tag)
        dataset = build_latent_dataset(
            items, cfg, bundle, device=ctx.device, multiple=bundle.latent_multiple,
            progress=lambda done, total: ctx.report("caching latents", done, total),
            should_stop=ctx.should_stop)
        ctx.state["batches"] = iter(BucketBatches(dataset, cfg.train_batch_size, ctx.seed, repeats=cfg.image_num_multiply))
        ctx.state["loss"] = make_loss(ctx)
        ctx.state["captions"] = tricks = CaptionTricks.from_config(cfg, ctx.seed)
        ctx.state["text"] = None
        if not ctx.network.trains_text_encoder:
            ctx.state["text"] = _text_cache(ctx, tricks, dataset.captions)
        left_out = set(dataset.skipped) | set(dataset.not_upscaled)
        used = [item.caption for item in items if item.path not in left_out]
        return PassInfo(num_images=dataset.images, tag_frequency=tag_frequency(used),
                        resolution=(cfg.image_size[1], cfg.image_size[0]))

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor:
        batch = next(ctx.state["batches"])
        latents = batch.latents.to(ctx.device, torch.float32, non_blocking=True)
        captions = ctx.state["captions"].batch(batch.captions)
        text = ctx.state["text"]
        if text is not None:
            cond = text.get(captions)
        elif ctx.network.trains_text_encoder:
            cond = ctx.encode_grad(captions)
        else:
            cond = ctx.encode(captions)
        mask = batch.masks if ctx.cfg.masked_loss else None
        return denoising_loss(ctx, latents, cond, batch_time_ids(ctx, batch), mask=mask)


def _text_cache(ctx: StepContext, tricks: CaptionTricks, captions: list[str]) -> TextCache | None:
    """A warmed TextCache for a frozen text encoder, or None when captions change every step.

    Whole-caption dropout alone keeps the cache: "" is one more cached caption.
    """
    from ..data import TextCache
    from ..data.captions import not_cached_message

    if tricks.changes_per_step:
        message = not_cached_message(tricks)
        log.warning(message)
        ctx.report(message, 0, 0)
        return None
    text = TextCache(ctx.encode)
    wanted = [*captions, ""] if tricks.dropout_rate > 0 else captions
    text.warm(wanted, lambda done, total: ctx.report("encoding captions", done, total), ctx.should_stop)
    ctx.offload_text_encoders()
    return text
