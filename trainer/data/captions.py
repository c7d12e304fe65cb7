"""Caption tricks applied each time a caption is used: tag shuffling, tag and caption dropout.

A caption is a list of comma-separated tags. The first ``keep_tokens`` tags stay where
they are and are never dropped; the scan puts the trigger word first, so it is one of
them (``keep_tokens=1`` keeps just the trigger in front). Per use, in this order:

1. with probability ``caption_dropout_rate`` the whole caption becomes the empty prompt "";
2. each tag after the kept ones is left out with probability ``caption_tag_dropout_rate``;
3. with ``caption_shuffle`` the remaining tags after the kept ones are shuffled.

One ``random.Random`` seeded from the pass's seed draws everything, so the same seed
gives the same captions in the same order, and the global RNG is never touched.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

SEPARATOR = ", "


def split_tags(caption: str) -> list[str]:
    """The caption's tags: split on commas, stripped, empty ones dropped."""
    return [t for t in (part.strip() for part in caption.split(",")) if t]


@dataclass
class CaptionTricks:
    """Seeded per-use caption changes (see the module docstring)."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    seed: int = 0
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(int(self.seed))

    @classmethod
    def from_config(cls, cfg: Any, seed: int) -> CaptionTricks:
        """The tricks ``cfg``'s data options ask for, drawing from ``seed``."""
        return cls(shuffle=bool(cfg.caption_shuffle), keep_tokens=int(cfg.keep_tokens),
                   dropout_rate=float(cfg.caption_dropout_rate),
                   tag_dropout_rate=float(cfg.caption_tag_dropout_rate), seed=seed)

    @property
    def active(self) -> bool:
        """True when any caption can differ from the one on disk."""
        return self.changes_per_step or self.dropout_rate > 0

    @property
    def changes_per_step(self) -> bool:
        """True when a caption can come out differently each use, not just as itself or ""."""
        return self.shuffle or self.tag_dropout_rate > 0

    @property
    def reasons(self) -> list[str]:
        """The options that make captions change per step (for the user's message)."""
        names = [("caption_shuffle", self.shuffle), ("caption_tag_dropout_rate", self.tag_dropout_rate > 0)]
        return [name for name, on in names if on]

    def apply(self, caption: str) -> str:
        """One use of ``caption``; unchanged text (not even re-joined) when no trick is on."""
        if not self.active:
            return caption
        if self.dropout_rate > 0 and self.rng.random() < self.dropout_rate:
            return ""
        if not self.changes_per_step:
            return caption
        tags = split_tags(caption)
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if self.tag_dropout_rate > 0:
            rest = [t for t in rest if self.rng.random() >= self.tag_dropout_rate]
        if self.shuffle:
            self.rng.shuffle(rest)
        return SEPARATOR.join(kept + rest)

    def batch(self, captions: Sequence[str]) -> list[str]:
        """``apply`` to each caption of a batch, in order."""
        return [self.apply(c) for c in captions]


def not_cached_message(tricks: CaptionTricks) -> str:
    """What the user is told when the text-encoder outputs cannot be cached."""
    return f"captions change every step ({', '.join(tricks.reasons)}): text-encoder outputs are not cached"
