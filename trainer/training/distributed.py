"""Data-parallel training over processes started by torchrun or accelerate launch (CLI only).

Every rank loads the model, caches the same data and draws the same seeded batches,
noise and timesteps; rank r keeps its rows of each combined batch (StepContext.shard).
Its loss is weighted by its share of the rows, so averaging the gradients over the
ranks gives the gradient of the combined batch's mean loss: N processes train what one
process trains with the whole batch. Rank 0 alone writes files and logs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import devices
from ..config.schema import TrainConfig
from ..config.params import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_MODES = ("LoRA",)
_WEIGHT = "_shard_weight"  # ctx.state key: this rank's share of the batch, times the world size
# Settings that make a rank write something; only rank 0 keeps them.
_WRITERS = {"logging_save_csv": False, "save_as_json": False, "sample_every_n_steps": 0, "eval_grid": False}


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the launched ones (torchrun's environment)."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    text = env.get(name, default)
    try:
        return int(str(text).strip())
    except ValueError:
        raise ConfigError(name, text, "must be a whole number (set by torchrun or accelerate launch)") from None


def launched_ranks(env: Mapping[str, str] | None = None) -> Ranks | None:
    """The launcher's RANK/WORLD_SIZE/LOCAL_RANK; None for a single process (no WORLD_SIZE, or 1)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    world = _env_int(env, "WORLD_SIZE")
    if world < 1:
        raise ConfigError("WORLD_SIZE", env["WORLD_SIZE"], "must be at least 1")
    if world == 1:
        return None
    rank = _env_int(env, "RANK", "")
    if not 0 <= rank < world:
        raise ConfigError("RANK", env.get("RANK"), f"must be from 0 to {world - 1} (WORLD_SIZE is {world})")
    local = _env_int(env, "LOCAL_RANK", str(rank))
    if local < 0:
        raise ConfigError("LOCAL_RANK", env.get("LOCAL_RANK"), "must not be negative")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not str(env.get(name, "")).strip():
            raise ConfigError(name, env.get(name, ""), "is not set; start the job with torchrun or accelerate launch")
    return Ranks(rank, world, local)


def rank_device(preference: str | None, local_rank: int) -> torch.device:
    """The accelerator numbered LOCAL_RANK (or the CPU); a device given with an index is kept."""
    device = devices.pick_device(preference)
    if device.type == "cpu" or device.index is not None:
        return device
    device = torch.device(device.type, local_rank)
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "set_device"):
        module.set_device(device)  # collectives and kernels follow the current device
    return device


def backend_for(device: torch.device) -> str:
    """torch's default collective backend for the device type (nccl for CUDA); gloo otherwise."""
    known = getattr(dist.Backend, "default_device_backend_map", {})
    return known.get(device.type, "gloo")


def shard_rows(n: int, rank: int, world: int) -> tuple[slice, float]:
    """Rank's rows of an n-row batch and the weight of its mean loss (rows·world/n).

    The weighted losses average to the combined batch's mean. A rank left without rows
    (a bucket's last batch smaller than the world) takes row 0 at weight 0: it still runs
    the same backward as the others, contributing nothing.
    """
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi == lo:
        return slice(0, 1), 0.0
    return slice(lo, hi), (hi - lo) * world / n


class GradAverager:
    """Averages the gradients of `params` over the ranks at the end of each backward.

    Each parameter's post-accumulate hook counts it ready; the last one starts one
    all-reduce of every gradient (flattened per dtype), in the same order on every rank.
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int):
        self.params, self.world, self.ready = params, world, 0
        self.handles = [p.register_post_accumulate_grad_hook(self._one_ready) for p in params]

    def _one_ready(self, _param: torch.Tensor) -> None:
        self.ready += 1
        if self.ready == len(self.params):
            self.ready = 0
            self.reduce()

    def reduce(self) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(self.world)
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class ShardedMode:
    """A mode whose steps train this rank's rows; losses are checked and averaged across ranks."""

    def __init__(self, inner: Any, ranks: Ranks):
        self.inner, self.ranks = inner, ranks
        self.name = inner.name

    def passes(self, cfg: TrainConfig):
        return self.inner.passes(cfg)

    def prepare(self, ctx):
        info = self.inner.prepare(ctx)
        batches = ctx.state.get("batches")
        if batches is None:
            raise ConfigError("mode", ctx.cfg.mode, "has no batches to split across processes")
        ctx.state["batches"] = self._sharded(batches, ctx)
        return info

    def _sharded(self, batches: Iterator, ctx) -> Iterator:
        """The same batches; each sets this rank's rows (a bucket's last batch may be smaller)."""
        for batch in batches:
            ctx.shard, ctx.state[_WEIGHT] = shard_rows(batch.latents.shape[0], self.ranks.rank, self.ranks.world)
            yield batch

    def loss(self, ctx, step: int) -> torch.Tensor:
        """This rank's weighted loss, valued at the combined batch's loss.

        The all-reduce of the values also carries a NaN or inf from any rank to all of
        them, so every rank fails at the same step instead of waiting for the others.
        Every trained parameter joins the graph (at zero cost) so each backward fires
        every gradient hook, on every rank.
        """
        local = self.inner.loss(ctx, step) * ctx.state.get(_WEIGHT, 1.0)
        params = ctx.state["_dp"].params
        local = local + 0.0 * sum(p.sum() for p in params)
        total = local.detach().float().clone()
        dist.all_reduce(total)
        total = (total / self.ranks.world).to(local.dtype)
        return local + (total - local).detach()


class DataParallel:
    """One launched job's process group, device and rules for its ranks."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks, self.device = ranks, device
        self.averagers: list[GradAverager] = []

    @classmethod
    def start(cls, ranks: Ranks, preference: str | None = None) -> DataParallel:
        """Join the launcher's process group (env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
        device = rank_device(preference, ranks.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend_for(device), init_method="env://", rank=ranks.rank,
                                    world_size=ranks.world)
        log.info("rank %d of %d on %s (%s)", ranks.rank, ranks.world, device, dist.get_backend())
        return cls(ranks, device)

    def close(self) -> None:
        self.detach()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- the job -------------------------------------------------------
    def configure(self, cfg: TrainConfig) -> TrainConfig:
        """Refuse what cannot be split; rank 0 keeps the job's logs and samples, the others write nothing."""
        world = self.ranks.world
        if cfg.mode not in SUPPORTED_MODES:
            raise ConfigError("mode", cfg.mode, f"is not supported with {world} processes; "
                              f"multi-process training runs {', '.join(SUPPORTED_MODES)} mode only")
        if cfg.train_batch_size % world:
            raise ConfigError("train_batch_size", cfg.train_batch_size,
                              f"must be divisible by the number of processes ({world}): it is the combined "
                              "batch, split evenly across them")
        return cfg if self.ranks.is_main else dataclasses.replace(cfg, **_WRITERS)

    def wrap_mode(self, mode: Any) -> ShardedMode:
        return ShardedMode(mode, self.ranks)

    def same_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank (a -1 seed is drawn per process)."""
        value = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(value, src=0)
        return int(value.item())

    def attach(self, ctx) -> None:
        """Give the pass rank 0's initial weights and average its gradients over the ranks."""
        params = [p for p in ctx.network.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
        ctx.shard, ctx.state[_WEIGHT] = shard_rows(ctx.cfg.train_batch_size, self.ranks.rank, self.ranks.world)
        averager = GradAverager(params, self.ranks.world)
        ctx.state["_dp"] = averager
        self.averagers.append(averager)

    def detach(self) -> None:
        for averager in self.averagers:
            averager.remove()
        self.averagers = []


__all__ = ["DataParallel", "GradAverager", "Ranks", "ShardedMode", "backend_for", "launched_ranks",
           "rank_device", "shard_rows"]
