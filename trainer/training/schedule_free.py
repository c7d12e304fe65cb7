"""Schedule-free optimizers (schedulefree's AdamWScheduleFree and kin) keep two weight sets.

They train on an interpolated point and switch to the averaged weights with
``.eval()``; saving and sampling must see the averaged ones.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sets and switch with .train()/.eval()."""
    return all(callable(getattr(optimizer, m, None)) for m in ("train", "eval")) and \
        "train_mode" in optimizer.param_groups[0]


def set_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Call optimizer.train()/eval() for schedule-free optimizers; nothing for the rest."""
    if not is_schedule_free(optimizer):
        return
    if training:
        optimizer.train()
    else:
        optimizer.eval()


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block the parameters hold the weights to save or sample with.

    Schedule-free optimizers train on an interpolated point; the averaged weights
    are the ones to keep, so saving must happen in eval mode.
    """
    set_train_mode(optimizer, False)
    try:
        yield
    finally:
        set_train_mode(optimizer, True)


__all__ = ["eval_weights", "is_schedule_free", "set_train_mode"]
