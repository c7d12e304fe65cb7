"""What a mode is: a small strategy over the one training loop in engine.py.

A mode says which passes it runs, prepares its data once per pass, and computes
the loss of one step. Saving, logging, precision, stopping and the optimizer
belong to the engine; no mode re-implements them.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from ..families.bundle import ModelBundle
from ..config.schema import TrainConfig
from ..training.events import StopFlag
from ..training.losses import DiffusionLoss
from ..training.noise import input_perturbation, noise_like

log = logging.getLogger(__name__)


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
    """One denoiser forward under the job's autocast, as the model's family runs it."""
    with ctx.autocast():
        return ctx.bundle.family.denoise(ctx.bundle, noisy, timesteps, cond, time_ids, device=ctx.device,
                                         dtype=ctx.dtype)


def make_loss(ctx: StepContext) -> DiffusionLoss:
    """The pass's loss function (kind, Huber schedule, min-SNR and debiased weights) on the training device."""
    return ctx.bundle.family.make_loss(ctx.cfg, train_scheduler(ctx), v_pred=ctx.bundle.v_pred, device=ctx.device)


def train_scheduler(ctx: StepContext) -> Any:
    """The pass's training noise schedule (a zero-terminal-SNR copy when asked), made once per pass."""
    cached = ctx.state.get("_train_scheduler")
    if cached is None:
        cached = ctx.bundle.training_scheduler(ctx.cfg.zero_terminal_snr)
        ctx.state["_train_scheduler"] = cached
        if ctx.cfg.zero_terminal_snr and not ctx.bundle.v_pred:
            # As kohya's sd-scripts: allowed, but an epsilon model cannot predict at zero SNR.
            message = "zero_terminal_snr is meant for v-prediction models; this model predicts epsilon"
            log.warning(message)
            ctx.report(message, 0, 0)
    return cached


def repeat_rows(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A one-row conditioning tensor repeated for the batch; None stays None."""
    return None if tensor is None else tensor.repeat(batch, 1)


def draw_noise(ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
    """The whole batch's noise with the pass's offset / multires settings, from the pass's generator."""
    cfg = ctx.cfg
    return noise_like(latents, offset=cfg.noise_offset, offset_random=cfg.noise_offset_random_strength,
                      multires_iterations=cfg.multires_noise_iterations,
                      multires_discount=cfg.multires_noise_discount, generator=ctx.generator)


def draw_timesteps(ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
    """The family's timesteps for a batch shaped like `latents`, from the pass's generator."""
    return ctx.bundle.family.sample_timesteps(ctx.cfg, latents.shape[0], tuple(latents.shape),
                                              generator=ctx.generator, device=ctx.device)


def batch_time_ids(ctx: StepContext, batch: Any) -> torch.Tensor | None:
    """The family's size conditioning for a data Batch (SDXL's time_ids); None when it has none."""
    return ctx.bundle.family.time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes,
                                      device=ctx.device, dtype=ctx.dtype)


def denoising_loss(ctx: StepContext, latents: torch.Tensor, cond: Any, time_ids: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The standard objective: noise the latents, predict epsilon (or v), weighted loss.

    With ip_noise_gamma the U-Net's input is noised with noise + γ·ξ (ξ a fresh N(0,1)),
    while the target stays the original noise (or the velocity made from it)."""
    cfg = ctx.cfg
    noise = draw_noise(ctx, latents)
    timesteps = draw_timesteps(ctx, latents)
    input_noise = noise
    if cfg.ip_noise_gamma > 0:
        input_noise = noise + input_perturbation(noise, cfg.ip_noise_gamma, generator=ctx.generator,
                                                 random_strength=cfg.ip_noise_gamma_random_strength)
    # Every rank draws the whole batch's noise, then keeps its rows: N ranks equal one process.
    latents, noise, input_noise, timesteps, time_ids, mask, cond = take_shard(
        ctx, latents, noise, input_noise, timesteps, time_ids, mask, cond)
    scheduler = train_scheduler(ctx)
    family = ctx.bundle.family
    noisy = family.noisy_input(scheduler, latents, input_noise, timesteps)
    pred = unet_predict(ctx, noisy, timesteps, cond, time_ids)
    target = family.target(scheduler, latents, noise, timesteps, ctx.bundle.v_pred)
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
