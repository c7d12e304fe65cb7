"""Difference (the copy-machine method): two passes over one original/target pair.

Pass 1 trains a copier network A on the original image, so that the model with A
reproduces it. Pass 2 keeps A applied and frozen and trains a new network B on the
target image; only B is the result. Both passes use the ordinary denoising loss
with `original prompt` as the caption (the same prompt in both, so B learns only
what differs between the images), on the images' own size.

Options: ``diff_save_1st_pass`` also writes A as ``<name>_copy``;
``diff_1st_pass_only`` stops after A (and saves it); ``diff_load_1st_pass`` loads A
from a file and skips pass 1; ``use_2nd_pass_settings`` takes pass 2's settings from
the preset's ``"2nd pass"`` object.
"""
from __future__ import annotations

import torch

from ..config.schema import TrainConfig
from ..data.pairs import PairDataset, check_pair_files, single_pair
from ..config.params import ConfigError
from .base import PassInfo, PassSpec, StepContext, denoising_loss, make_loss, repeat_rows

COPIER, DIFFERENCE = "copier", "difference"


class DifferenceMode:
    name = "Difference"

    def __init__(self) -> None:
        self._pair: PairDataset | None = None  # encoded once, used by both passes
        self._cond = None

    def passes(self, cfg: TrainConfig) -> list[PassSpec]:
        check_pair_files(cfg)  # before any model is loaded
        loaded = cfg.diff_load_1st_pass.strip()
        if loaded and cfg.diff_1st_pass_only:
            raise ConfigError("diff_1st_pass_only", True, "with diff_load_1st_pass set there is nothing to train")
        copier = PassSpec(cfg.for_pass(1), suffix="_copy", label="copier (pass 1)", role=COPIER,
                          save=not loaded and (cfg.diff_save_1st_pass or cfg.diff_1st_pass_only),
                          keep_applied=not cfg.diff_1st_pass_only, load_from=loaded)
        if cfg.diff_1st_pass_only:
            return [copier]
        return [copier, PassSpec(cfg.for_pass(2), label="difference (pass 2)", role=DIFFERENCE)]

    def prepare(self, ctx: StepContext) -> PassInfo:
        cfg = ctx.cfg
        if self._pair is None:
            self._pair = single_pair(cfg, ctx.bundle, device=ctx.device, orig_caption=cfg.original_prompt,
                                     targ_caption=cfg.original_prompt, should_stop=ctx.should_stop)
            self._cond = ctx.encode([cfg.original_prompt])
        ctx.offload_text_encoders()
        copier = ctx.spec is None or ctx.spec.role == COPIER
        sample = self._pair.origs.samples[0] if copier else self._pair.targs[0]
        batch = cfg.train_batch_size
        ctx.state.update(latents=sample.latent[None].repeat(batch, 1, 1, 1).to(ctx.device),
                         cond=self._cond.repeat(batch).to(ctx.device), loss=make_loss(ctx),
                         time_ids=repeat_rows(ctx.bundle.family.time_ids(
                             sample.original_size, sample.crop_top_left, sample.target_size,
                             device=ctx.device, dtype=ctx.dtype), batch))
        return PassInfo(num_images=1, resolution=sample.bucket)

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor:
        st = ctx.state
        return denoising_loss(ctx, st["latents"], st["cond"], st["time_ids"])
