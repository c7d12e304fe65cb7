"""What a mode is: a small strategy over the one training loop in engine.py.

A mode says which passes it runs, prepares its data once per pass, and computes
the loss of one step. Saving, logging, precision, stopping and the optimizer
belong to the engine; no mode re-implements them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from ..bundle import ModelBundle
from ..config import TrainConfig
from ..events import StopFlag


@dataclass
class PassSpec:
    """One training pass (Difference has two)."""

    cfg: TrainConfig
    suffix: str = ""            # added to the file and log names, e.g. "_copy"
    save: bool = True           # write the network when the pass ends
    keep_applied: bool = False  # leave the network in the model, frozen, for the next pass
    load_from: str = ""         # skip training: load this network file instead
    label: str = ""             # shown in progress ("copier", "difference")


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


def tag_frequency(captions: list[str], folder_name: str = "data") -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {folder: {tag: count}} from comma-separated captions."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {folder_name: counts}
