"""Text-conditioning cache for when the text encoder is frozen.

Each distinct caption is encoded once, on its own, through ``encode_fn([caption])``.
Keying by caption (not by a batch's tuple of captions) is what makes the cache work:
shuffled batches almost never repeat as tuples.

Captions over 75 tokens encode to longer sequences (77, 154, 231... tokens). A batch
whose captions differ in length is padded to its longest by appending the empty
prompt's encoding (one 77-token chunk, itself cached under ""), which is what the
WebUI does when it batches prompts of different chunk counts. The pooled output (SDXL)
is per caption and needs no padding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from .stop import check_stop

EncodeFn = Callable[[list[str]], Any]


@dataclass
class CondBatch:
    """Cond-like result when encode_fn's own type cannot be rebuilt."""

    hidden: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None  # [B, P] or None


class TextCache:
    """Memoizes ``encode_fn`` per caption; ``get`` assembles a batch's conditioning."""

    def __init__(self, encode_fn: EncodeFn):
        self.encode_fn = encode_fn
        self._memo: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._memo)

    def __contains__(self, caption: str) -> bool:
        return caption in self._memo

    def one(self, caption: str) -> Any:
        """The conditioning of one caption ([1, L, D]), encoding it on first use."""
        cond = self._memo.get(caption)
        if cond is None:
            cond = self.encode_fn([caption])
            if cond.hidden.shape[0] != 1:
                raise ValueError(f"encode_fn returned {cond.hidden.shape[0]} rows for one caption")
            self._memo[caption] = _detached(cond)
            cond = self._memo[caption]
        return cond

    def warm(self, captions: Iterable[str], progress: Callable[[int, int], Any] | None = None,
             should_stop: Callable[[], bool] | None = None) -> None:
        """Encode every caption now (e.g. before the text encoder is moved off the device)."""
        todo = list(dict.fromkeys(captions))
        for n, caption in enumerate(todo):
            check_stop(should_stop)
            self.one(caption)
            if progress is not None:
                progress(n + 1, len(todo))

    def get(self, captions: Sequence[str]) -> Any:
        """Conditioning for a batch: hidden [B, L_max, D] and pooled [B, P] or None."""
        if not captions:
            raise ValueError("no captions")
        conds = [self.one(c) for c in captions]
        longest = max(c.hidden.shape[1] for c in conds)
        hidden = torch.cat([self._pad(c.hidden, longest) for c in conds])
        pooled_parts = [c.pooled for c in conds]
        if any(p is None for p in pooled_parts):
            pooled = None
        else:
            pooled = torch.cat(pooled_parts)
        first = conds[0]
        if dataclasses.is_dataclass(first) and not isinstance(first, type):
            return dataclasses.replace(first, hidden=hidden, pooled=pooled)
        return CondBatch(hidden, pooled)

    def _pad(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """Append empty-prompt chunks until ``hidden`` has ``length`` tokens."""
        if hidden.shape[1] == length:
            return hidden
        empty = self.one("").hidden
        missing = length - hidden.shape[1]
        if missing % empty.shape[1]:
            raise ValueError(f"cannot pad a {hidden.shape[1]}-token conditioning to {length} tokens "
                             f"with {empty.shape[1]}-token chunks")
        chunks = [empty.to(hidden.device, hidden.dtype)] * (missing // empty.shape[1])
        return torch.cat([hidden, *chunks], dim=1)


def _detached(cond: Any) -> Any:
    """The same object with its tensors detached, so cached values hold no graph."""
    pooled = cond.pooled.detach() if cond.pooled is not None else None
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        return dataclasses.replace(cond, hidden=cond.hidden.detach(), pooled=pooled)
    return CondBatch(cond.hidden.detach(), pooled)
