"""What a mode is: a small strategy over the one training loop in engine.py.

A mode says which passes it runs, prepares its data once per pass, and computes
the loss of one step. Saving, logging, precision, stopping and the optimizer
belong to the engine; no mode re-implements them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from ..bundle import ModelBundle
from ..config import TrainConfig
from ..events import StopFlag
from ..losses import DiffusionLoss, noise_like, sample_timesteps, training_target


@dataclass
class PassSpec:
    """One training pass (Difference has two)."""

    cfg: TrainConfig
    suffix: str = ""            # added to the file and log names, e.g. "_copy"
    save: bool = True           # write the network when the pass ends
    keep_applied: bool = False  # leave the network in the model, frozen, for the next pass
    load_from: str = ""         # skip training: load this network file instead
    label: str = ""             # shown in progress ("copier", "difference")
    role: str = "main"          # which part of the mode this pass is ("copier", "difference", ...)


@dataclass
class PassInfo:
    """What prepare() learned, for metadata and progress."""

    num_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    resolution: tuple[int, int] = (512, 512)


@dataclass
class StepContext:
    """Everything a mode may use; built by the engine once per pass."""

    cfg: TrainConfig
    bundle: ModelBundle
    network: Any
    device: torch.device
    dtype: torch.dtype                       # compute dtype of the frozen model
    seed: int
    generator: torch.Generator               # on `device`: noise and timesteps
    stop: StopFlag
    encode: Callable[[list[str]], Any]       # prompts -> Cond, no grad
    encode_grad: Callable[[list[str]], Any]  # prompts -> Cond, keeps the graph (text encoder training)
    autocast: Callable[[], ContextManager]
    report: Callable[[str, int, int], None]  # (message, done, total) while preparing
    frozen: list = field(default_factory=list)  # networks of earlier passes, still applied
    state: dict[str, Any] = field(default_factory=dict)
    spec: PassSpec | None = None             # the pass being trained
    shard: slice | None = None               # data-parallel: this rank's rows of each combined batch

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        cached = self.state.get("_alphas")
        if cached is None:
            cached = self.bundle.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
            self.state["_alphas"] = cached
        return cached

    def should_stop(self) -> bool:
        return self.stop.requested

    def offload_text_encoders(self) -> None:
        """Move frozen text encoders off the accelerator once prompts are cached."""
        if self.device.type != "cpu":
            for te in self.bundle.text_encoders:
                te.to("cpu")


class Mode(Protocol):
    name: str

    def passes(self, cfg: TrainConfig) -> list[PassSpec]: ...

    def prepare(self, ctx: StepContext) -> PassInfo: ...

    def loss(self, ctx: StepContext, step: int) -> torch.Tensor: ...


def unet_predict(ctx: StepContext, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any,
                 time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One U-Net forward under the job's autocast; SDXL gets its added conditioning."""
    hidden = cond.hidden.to(ctx.device, ctx.dtype)
    kwargs: dict[str, Any] = {}
    if ctx.bundle.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(ctx.device, ctx.dtype), "time_ids": time_ids}
    with ctx.autocast():
        return ctx.bundle.unet(noisy.to(ctx.dtype), timesteps, hidden, return_dict=False, **kwargs)[0]


def make_loss(ctx: StepContext) -> DiffusionLoss:
    """The pass's loss function (kind, min-SNR weights) on the training device."""
    cfg = ctx.cfg
    return DiffusionLoss(cfg.train_loss_function, ctx.bundle.noise_scheduler.alphas_cumprod,
                         snr_gamma=cfg.train_snr_gamma, v_pred=ctx.bundle.v_pred, device=ctx.device)


def draw_timesteps(ctx: StepContext, batch: int) -> torch.Tensor:
    """Timesteps in [train_min_timesteps, train_max_timesteps) from the pass's generator."""
    cfg = ctx.cfg
    return sample_timesteps(batch, cfg.train_min_timesteps, cfg.train_max_timesteps,
                            same_in_batch=cfg.train_fixed_timsteps_in_batch, generator=ctx.generator,
                            device=ctx.device)


def batch_time_ids(ctx: StepContext, batch: Any) -> torch.Tensor | None:
    """SDXL's size conditioning for a data Batch; None for SD1/SD2."""
    if not ctx.bundle.is_sdxl:
        return None
    from ..textenc import sdxl_time_ids

    return sdxl_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes,
                         device=ctx.device, dtype=ctx.dtype)


def denoising_loss(ctx: StepContext, latents: torch.Tensor, cond: Any, time_ids: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The standard objective: noise the latents, predict epsilon (or v), weighted loss."""
    noise = noise_like(latents, offset=ctx.cfg.noise_offset, generator=ctx.generator)
    timesteps = draw_timesteps(ctx, latents.shape[0])
    # Every rank draws the whole batch's noise, then keeps its rows: N ranks equal one process.
    latents, noise, timesteps, time_ids, mask, cond = take_shard(ctx, latents, noise, timesteps, time_ids, mask, cond)
    noisy = ctx.bundle.noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet_predict(ctx, noisy, timesteps, cond, time_ids)
    target = training_target(ctx.bundle.noise_scheduler, latents, noise, timesteps, ctx.bundle.v_pred)
    loss, _ = ctx.state["loss"](pred.float(), target, timesteps, mask)
    return loss


def take_shard(ctx: StepContext, *items: Any) -> tuple:
    """This rank's rows of each batch tensor (and of a Cond's tensors); all of them without a shard."""
    if ctx.shard is None:
        return items
    rows = ctx.shard

    def take(item: Any) -> Any:
        if item is None:
            return None
        if isinstance(item, torch.Tensor):
            return item[rows]
        pooled = None if item.pooled is None else item.pooled[rows]
        return dataclasses.replace(item, hidden=item.hidden[rows], pooled=pooled)

    return tuple(take(item) for item in items)


def tag_frequency(captions: list[str], folder_name: str = "data") -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {folder: {tag: count}} from comma-separated captions."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {folder_name: counts}
