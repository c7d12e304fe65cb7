"""Endless, seeded batches where every batch comes from one bucket."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .buckets import Bucket
from .cache import LatentDataset
from .variants import Sample


@dataclass
class Batch:
    """One training step's images, all the same size."""

    latents: torch.Tensor  # [B, 4, h, w]
    captions: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width) per image
    crop_top_lefts: list[tuple[int, int]]
    target_sizes: list[tuple[int, int]]  # (height, width) per image
    masks: torch.Tensor | None  # [B, 1, h, w] in 0..1 (1 where an image has no alpha), or None
    bucket: Bucket
    epoch: int

    def __len__(self) -> int:
        return len(self.captions)


def collate_samples(samples: list[Sample], epoch: int = 0) -> Batch:
    """Stack samples of one bucket into a Batch (opaque images get an all-ones mask)."""
    masks = None
    if any(s.mask is not None for s in samples):
        masks = torch.stack([s.mask if s.mask is not None else torch.ones_like(s.latent[:1]) for s in samples])
    return Batch(
        latents=torch.stack([s.latent for s in samples]),
        captions=[s.caption for s in samples],
        original_sizes=[s.original_size for s in samples],
        crop_top_lefts=[s.crop_top_left for s in samples],
        target_sizes=[s.target_size for s in samples],
        masks=masks, bucket=samples[0].bucket, epoch=epoch,
    )


class BucketBatches:
    """Yields Batch objects forever; the training loop stops on its own step count.

    Each epoch every sample appears ``repeats`` times (``image_num_multiply``). Within
    each bucket the items are shuffled and cut into batches of ``batch_size``; a bucket's
    remainder (or a bucket with fewer items than ``batch_size``) becomes one smaller
    batch rather than being dropped or mixed with another size. The order of all
    batches is then shuffled. One torch.Generator seeded with ``seed`` drives every
    shuffle, so a seed gives the same sequence each run and another seed a different one.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, seed: int, repeats: int = 1):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"batch_size and repeats must be at least 1, got {batch_size} and {repeats}")
        self.dataset, self.batch_size, self.repeats = dataset, batch_size, repeats
        self.groups = dataset.bucket_indices()
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch = 0  # the epoch the last yielded batch belongs to (1-based); 0 before the first

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-len(idx) * self.repeats // self.batch_size) for idx in self.groups.values())

    def _epoch_plan(self) -> list[list[int]]:
        """Index lists of one epoch's batches, in training order."""
        chunks: list[list[int]] = []
        for indices in self.groups.values():
            pool = torch.tensor(indices * self.repeats)
            pool = pool[torch.randperm(len(pool), generator=self.generator)].tolist()
            chunks += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        order = torch.randperm(len(chunks), generator=self.generator).tolist()
        return [chunks[i] for i in order]

    def collate(self, indices: list[int]) -> Batch:
        """Stack samples (all from one bucket) into a Batch."""
        return collate_samples([self.dataset.samples[i] for i in indices], self.epoch)

    def __iter__(self) -> "BatchStream":
        return BatchStream(self)


class BatchStream(Iterator[Batch]):
    """The endless iterator of a BucketBatches; counts what it gave and can skip ahead.

    ``skip(k)`` draws the same epoch plans as k calls of ``next`` but stacks no tensors,
    so a resumed run reaches batch k + 1 in the order an uninterrupted run would have.
    """

    def __init__(self, source: BucketBatches):
        self.source = source
        self.position = 0  # batches given (or skipped) so far
        self._plan: list[list[int]] = []
        self._next = 0  # index in _plan of the next batch

    def _next_indices(self) -> list[int]:
        if self._next >= len(self._plan):  # the next epoch is planned only when needed, as before
            self._plan = self.source._epoch_plan()
            self.source.epoch += 1
            self._next = 0
        indices = self._plan[self._next]
        self._next += 1
        self.position += 1
        return indices

    def __next__(self) -> Batch:
        return self.source.collate(self._next_indices())

    def skip(self, count: int) -> None:
        """Advance past ``count`` batches without collating them."""
        if count < 0:
            raise ValueError(f"cannot skip {count} batches")
        for _ in range(count):
            self._next_indices()
