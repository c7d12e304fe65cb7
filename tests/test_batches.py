"""Bucket batches (seeded, one bucket per batch) and the text-conditioning cache."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest
import torch

from trainer.data import BucketBatches, CondBatch, Stopped, TextCache
from trainer.data.buckets import make_buckets
from trainer.data.cache import LatentDataset
from trainer.data.variants import Sample


def _dataset(counts: dict[tuple[int, int], int], masked: set[int] = frozenset()) -> LatentDataset:
    """Fake cached samples; latent value i identifies sample i."""
    samples = []
    for (w, h), n in counts.items():
        for _ in range(n):
            i = len(samples)
            mask = torch.full((1, h // 8, w // 8), 0.5) if i in masked else None
            samples.append(Sample(torch.full((4, h // 8, w // 8), float(i)), f"cap {i}", (w, h), (h + i, w),
                                  (i, 0), mask, Path(f"{i}.png")))
    return LatentDataset(samples, make_buckets([128, 128], 64, 64, 2.0, 64))


def _ids(batch) -> list[int]:
    return [int(x) for x in batch.latents[:, 0, 0, 0]]


COUNTS = {(128, 128): 5, (64, 128): 3, (128, 64): 1}


def test_batches_come_from_one_bucket_and_cover_an_epoch():
    data = _dataset(COUNTS)
    bb = BucketBatches(data, batch_size=2, seed=1)
    assert bb.batches_per_epoch == 3 + 2 + 1
    epoch = list(islice(iter(bb), bb.batches_per_epoch))
    assert all(b.epoch == 1 for b in epoch) and bb.epoch == 1
    seen = []
    for b in epoch:
        ids = _ids(b)
        assert {data.samples[i].bucket for i in ids} == {b.bucket}
        assert b.latents.shape == (len(ids), 4, b.bucket[1] // 8, b.bucket[0] // 8)
        assert b.captions == [f"cap {i}" for i in ids]
        assert b.target_sizes == [(b.bucket[1], b.bucket[0])] * len(ids)
        assert b.original_sizes == [data.samples[i].original_size for i in ids]
        assert b.crop_top_lefts == [(i, 0) for i in ids]
        assert b.masks is None
        seen += ids
    assert sorted(seen) == list(range(9))
    # The single-item bucket gives a batch of one; the odd bucket of 5 a batch of 1 too.
    assert sorted(len(b) for b in epoch) == [1, 1, 1, 2, 2, 2]


def test_epoch_counter_and_repeats():
    data = _dataset(COUNTS)
    bb = BucketBatches(data, batch_size=4, seed=0, repeats=3)
    per_epoch = bb.batches_per_epoch
    assert per_epoch == 4 + 3 + 1  # 15, 9 and 3 items
    it = iter(bb)
    first = list(islice(it, per_epoch))
    assert Counter(i for b in first for i in _ids(b)) == {i: 3 for i in range(9)}
    second = next(it)
    assert bb.epoch == 2 and second.epoch == 2


def _sequence(seed: int, n: int = 20) -> list[list[int]]:
    return [_ids(b) for b in islice(iter(BucketBatches(_dataset(COUNTS), 2, seed)), n)]


def test_deterministic_per_seed_and_different_across_seeds():
    assert _sequence(7) == _sequence(7)
    assert _sequence(7) != _sequence(8)
    epochs = _sequence(7, 12)
    assert epochs[:6] != epochs[6:]  # each epoch is shuffled anew
    assert _sequence(-1) == _sequence(-1)


def test_masks_fill_ones_for_opaque_images():
    data = _dataset({(64, 64): 2}, masked={0})
    batch = next(iter(BucketBatches(data, 2, 0)))
    order = _ids(batch)
    assert batch.masks.shape == (2, 1, 8, 8)
    assert float(batch.masks[order.index(0)].mean()) == 0.5
    assert float(batch.masks[order.index(1)].mean()) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatches(_dataset({}), 2, 0)
    with pytest.raises(ValueError):
        BucketBatches(_dataset(COUNTS), 0, 0)


# ---- text cache ---------------------------------------------------------------------
@dataclass
class Cond:
    hidden: torch.Tensor
    pooled: torch.Tensor | None
    tag: str = "cond"


class FakeEncoder:
    """One 77-token chunk per 10 characters; hidden values encode the caption."""

    def __init__(self, pooled: bool = True, kind=Cond):
        self.calls: list[list[str]] = []
        self.pooled, self.kind = pooled, kind

    def __call__(self, captions: list[str]):
        self.calls.append(list(captions))
        chunks = max(1, -(-len(captions[0]) // 10))
        hidden = torch.full((1, 77 * chunks, 3), float(len(captions[0])), requires_grad=True) * 1.0
        pooled = torch.full((1, 2), float(len(captions[0]))) if self.pooled else None
        return self.kind(hidden, pooled)


def test_text_cache_encodes_each_caption_once():
    enc = FakeEncoder()
    cache = TextCache(enc)
    a = cache.get(["short", "tiny", "short"])
    b = cache.get(["tiny", "short"])
    assert enc.calls == [["short"], ["tiny"]]
    assert isinstance(a, Cond) and a.tag == "cond"
    assert a.hidden.shape == (3, 77, 3) and a.pooled.shape == (3, 2)
    assert a.hidden[:, 0, 0].tolist() == [5.0, 4.0, 5.0] and b.pooled[:, 0].tolist() == [4.0, 5.0]
    assert not a.hidden.requires_grad


def test_text_cache_pads_long_captions_with_empty_chunks():
    enc = FakeEncoder()
    cache = TextCache(enc)
    long = "x" * 25  # three chunks
    out = cache.get(["ab", long])
    assert out.hidden.shape == (2, 231, 3)
    assert torch.equal(out.hidden[1], torch.full((231, 3), 25.0))
    assert torch.equal(out.hidden[0, :77], torch.full((77, 3), 2.0))
    assert torch.equal(out.hidden[0, 77:], torch.zeros(154, 3))  # "" encodes to 0 here
    assert enc.calls == [["ab"], [long], [""]]
    cache.get(["", long, "ab"])
    assert len(enc.calls) == 3


def test_text_cache_without_pooled_and_plain_objects():
    class Plain:
        def __init__(self, hidden, pooled):
            self.hidden, self.pooled = hidden, pooled

    cache = TextCache(FakeEncoder(pooled=False, kind=Plain))
    out = cache.get(["a", "b"])
    assert isinstance(out, CondBatch) and out.pooled is None and out.hidden.shape == (2, 77, 3)


def test_text_cache_warm_and_stop():
    enc = FakeEncoder()
    cache = TextCache(enc)
    seen = []
    cache.warm(["a", "b", "a", "c"], progress=lambda d, t: seen.append((d, t)))
    assert len(cache) == 3 and seen == [(1, 3), (2, 3), (3, 3)] and "b" in cache
    with pytest.raises(Stopped):
        cache.warm(["d", "e"], should_stop=lambda: True)
    assert "d" not in cache and len(enc.calls) == 3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_cache_matches_batched_encoding(family):
    """Per-caption caching plus empty-chunk padding equals encoding the batch together."""
    from tests.tiny import tiny_bundle
    from trainer.families.textenc import encode_prompts

    bundle = tiny_bundle(family)
    short, long = "a photo of a cat", "a photo of a cat, " * 20  # 1 and 2 chunks of 77 tokens
    cache = TextCache(lambda prompts: encode_prompts(bundle, prompts))
    got = cache.get([short, long, short])
    want = encode_prompts(bundle, [short, long, short])
    assert type(got) is type(want) and got.hidden.shape == want.hidden.shape == (3, 154, want.hidden.shape[-1])
    assert torch.allclose(got.hidden, want.hidden, atol=1e-5)
    if family == "sdxl":
        assert torch.allclose(got.pooled, want.pooled, atol=1e-5)
    else:
        assert got.pooled is None
