"""ADDifT and Multi-ADDifT: train the difference of image pairs directly, in one pass.

Both images of a pair get the same noise ε and timestep t (drawn from the
configured range). With x_t(a) = add_noise(a, ε, t), steps 1, 3, 5, ... train

    loss = w(t) · ‖ε̂_net(x_t(target), t, c_target; +0.25) − sg[ε̂_base(x_t(original), t, c_original)]‖²

and steps 2, 4, 6, ... swap the two latents (the captions stay) and apply the network
at −0.25·|diff_alt_ratio|. A negative ``diff_alt_ratio`` makes those steps use the
noise itself as both latents instead: a regulariser that keeps the negated network
from changing pure noise. ``diff_alt_ratio`` 0 turns the swapped steps off. ε̂_base is the same U-Net with the network unhooked, under
no_grad. The multiplier 0.25 is TrainTrain's, so a saved file at weight 1.0 carries
4× the trained effect, as TrainTrain's ADDifT files do. With ``diff_use_diff_mask``
the loss is averaged only over latent cells where the pair differs.
``diff_revert_original_target`` swaps original and target (captions included).

The loss options apply as in the other modes (loss kind and Huber schedule, min-SNR and
debiased weights, zero-terminal SNR, offset and multires noise), except ``ip_noise_gamma``:
the objective compares two predictions on the same noise, not a prediction with that noise.

ADDifT takes the pair from ``diff_original_image`` / ``diff_target_image`` with the
original and target prompts; Multi-ADDifT takes every ``x`` / ``x<diff_target_name>``
pair of ``lora_data_directory``, with each image's own caption.
"""
from __future__ import annotations

import torch

from ..config.schema import TrainConfig
from ..data import TextCache
from ..data.pairs import PairBatches, PairDataset, check_pair_files, find_pairs, folder_pairs, single_pair
from .base import (PassInfo, PassSpec, StepContext, batch_time_ids, draw_noise, draw_timesteps, make_loss,
                   tag_frequency, train_scheduler, unet_predict)

TRAIN_MULTIPLIER = 0.25  # TrainTrain's ADDifT multiplier while training


def swapped_step(step: int, alt_ratio: float) -> bool:
    """Even steps swap the pair, unless diff_alt_ratio is 0 (then every step goes forward)."""
    return step % 2 == 0 and alt_ratio != 0


def step_multiplier(step: int, alt_ratio: float) -> float:
    """+0.25 on forward steps, −0.25·|alt_ratio| on swapped ones."""
    return -TRAIN_MULTIPLIER * abs(alt_ratio) if swapped_step(step, alt_ratio) else TRAIN_MULTIPLIER


def _swapped(pairs: PairDataset) -> PairDataset:
    origs = pairs.origs
    origs_swapped = type(origs)(pairs.targs, origs.buckets, images=origs.images)
    return PairDataset(origs_swapped, list(origs.samples), pairs.masks)


class AddiftMode:
    def __init__(self, name: str = "ADDifT") -> None:
        self.name = name

    @property
    def multi(self) -> bool:
        return self.name == "Multi-ADDifT"

    def passes(self, cfg: TrainConfig) -> list[PassSpec]:
        # The inputs are checked before any model is loaded.
        if self.multi:
            find_pairs(cfg.lora_data_directory, cfg.diff_target_name)
        else:
            check_pair_files(cfg)
        return [PassSpec(cfg)]

    def prepare(self, ctx: StepContext) -> PassInfo:
        cfg = ctx.cfg
        report = lambda done, total: ctx.report("caching latents", done, total)  # noqa: E731
        if self.multi:
            pairs = folder_pairs(cfg, ctx.bundle, device=ctx.device, progress=report, should_stop=ctx.should_stop)
        else:
            pairs = single_pair(cfg, ctx.bundle, device=ctx.device, orig_caption=cfg.original_prompt,
                                targ_caption=cfg.target_prompt, should_stop=ctx.should_stop)
        if cfg.diff_revert_original_target:
            pairs = _swapped(pairs)
        captions = [s.caption for s in (*pairs.origs.samples, *pairs.targs)]
        text = TextCache(ctx.encode)
        text.warm(dict.fromkeys(captions), lambda done, total: ctx.report("encoding captions", done, total),
                  ctx.should_stop)
        ctx.offload_text_encoders()
        # One pair fills the batch with copies of itself (each gets its own noise and timestep).
        repeats = cfg.image_num_multiply if self.multi else max(cfg.image_num_multiply, cfg.train_batch_size)
        ctx.state.update(text=text, loss=make_loss(ctx),
                         batches=iter(PairBatches(pairs, cfg.train_batch_size, ctx.seed, repeats)))
        first = pairs.origs.samples[0]
        return PassInfo(num_images=2 * pairs.origs.images, tag_frequency=tag_frequency(captions),
                        resolution=first.bucket)

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor:
        st, cfg = ctx.state, ctx.cfg
        pb = next(st["batches"])
        orig = pb.orig.latents.to(ctx.device, torch.float32)
        targ = pb.targ.latents.to(ctx.device, torch.float32)
        noise = draw_noise(ctx, orig)
        timesteps = draw_timesteps(ctx, orig)
        swapped = swapped_step(step, cfg.diff_alt_ratio)
        base_in, net_in = (targ, orig) if swapped else (orig, targ)
        if swapped and cfg.diff_alt_ratio < 0:
            base_in = net_in = noise
        scheduler, family = train_scheduler(ctx), ctx.bundle.family

        def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return family.noisy_input(scheduler, latents, noise, t)

        with torch.no_grad(), ctx.network.disabled():
            base = unet_predict(ctx, add_noise(base_in, noise, timesteps), timesteps,
                                st["text"].get(pb.orig.captions), batch_time_ids(ctx, pb.orig))
        with ctx.network.scaled(step_multiplier(step, cfg.diff_alt_ratio)):
            pred = unet_predict(ctx, add_noise(net_in, noise, timesteps), timesteps,
                                st["text"].get(pb.targ.captions), batch_time_ids(ctx, pb.targ))
        mask = pb.mask if cfg.diff_use_diff_mask else None
        loss, _ = st["loss"](pred.float(), base.float(), timesteps, mask)
        return loss
