"""Prompt encoding the way A1111 conditions each model family.

Long prompts are split into 75-token chunks, each wrapped as BOS + tokens + EOS
and padded to 77, then concatenated along the sequence. Works with transformers
4.x and 5.x (5.x's CLIPTextModel has no `.text_model` level).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .bundle import ModelBundle

CHUNK = 75  # tokens per chunk between BOS and EOS


@dataclass
class Cond:
    """Text conditioning: hidden states [B, 77*k, D] and, for SDXL, pooled [B, 1280]."""

    hidden: Tensor
    pooled: Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cond":
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return Cond(self.hidden.to(device=device, dtype=dtype), pooled)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> "Cond":
        """Select batch rows (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Cond(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def repeat(self, n: int) -> "Cond":
        """Each row repeated n times in a row (for a batch sharing one prompt)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, 0)
        return Cond(self.hidden.repeat_interleave(n, 0), pooled)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Join along the batch. Lengths must match: prompts of different chunk counts
        should be encoded together, which pads them with empty-prompt chunks."""
        lengths = {c.hidden.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch conditionings of different lengths {sorted(lengths)}; "
                             "encode the prompts together")
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.hidden for c in conds]), pooled)


def _transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text transformer (final_layer_norm lives here) in transformers 4 and 5."""
    return getattr(text_encoder, "text_model", text_encoder)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def chunk_ids(tokenizer, prompts: list[str]) -> Tensor:
    """Token ids [B, k, 77]: each prompt split into 75-token chunks with BOS/EOS and padding.

    All prompts get the largest chunk count; missing chunks are the empty prompt.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = [tokenizer(p, add_special_tokens=False, truncation=False)["input_ids"] for p in prompts]
    k = max(1, *((len(t) + CHUNK - 1) // CHUNK for t in tokens))
    rows = []
    for toks in tokens:
        chunks = []
        for i in range(k):
            part = toks[i * CHUNK:(i + 1) * CHUNK]
            chunks.append([bos, *part, eos] + [pad] * (CHUNK - len(part)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def _run(text_encoder, ids: Tensor, *, layer: int | None, final_norm: bool):
    """hidden states of `layer` (None: last_hidden_state) and the encoder's raw output."""
    out = text_encoder(ids.to(_device(text_encoder)), output_hidden_states=True)
    if layer is None:
        return out.last_hidden_state, out
    hidden = out.hidden_states[layer]
    if final_norm:
        hidden = _transformer(text_encoder).final_layer_norm(hidden)
    return hidden, out


def _encode_chunked(text_encoder, ids: Tensor, *, layer: int | None, final_norm: bool) -> tuple[Tensor, object]:
    """Encode [B, k, 77] ids chunk by chunk; returns [B, 77*k, D] and the first chunk's output."""
    b, k, n = ids.shape
    hidden, out = _run(text_encoder, ids.reshape(b * k, n), layer=layer, final_norm=final_norm)
    hidden = hidden.reshape(b, k * n, hidden.shape[-1])
    return hidden, out


def _sd_layer(clip_skip: int) -> tuple[int | None, bool]:
    """A1111's CLIP skip: 1 uses the last layer's normed output, n > 1 hidden_states[-n] + final norm."""
    return (None, False) if clip_skip <= 1 else (-clip_skip, True)


def encode_prompts(bundle: ModelBundle, prompts: list[str], *, clip_skip: int | None = None,
                   grad: bool = False) -> Cond:
    """Conditioning for `prompts` as A1111 builds it for the bundle's family (the family decides).

    `grad=True` keeps the graph for text encoder training.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    skip = bundle.clip_skip if clip_skip is None else clip_skip
    with contextlib.nullcontext() if grad else torch.no_grad():
        return bundle.family.encode_prompts(bundle, prompts, clip_skip=skip, grad=grad)


def encode_single(bundle: ModelBundle, prompts: list[str], *, clip_skip: int) -> Cond:
    """One CLIP encoder: the last layer's normed output, or A1111's clip skip (hidden_states[-n] and
    the final norm). SD2's loader already stops OpenCLIP at its penultimate layer."""
    layer, norm = _sd_layer(clip_skip)
    ids = chunk_ids(bundle.tokenizers[0], prompts)
    hidden, _ = _encode_chunked(bundle.text_encoders[0], ids, layer=layer, final_norm=norm)
    return Cond(hidden)


def encode_dual(bundle: ModelBundle, prompts: list[str]) -> Cond:
    """SDXL: CLIP-L and OpenCLIP-G penultimate hidden states side by side; pooled = G's projected
    pooled output of the first chunk."""
    parts, pooled = [], None
    for i, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers, strict=True)):
        ids = chunk_ids(tok, prompts)
        hidden, out = _encode_chunked(te, ids, layer=-2, final_norm=False)
        parts.append(hidden)
        if i == 1:
            b, k = ids.shape[:2]
            pooled = out.text_embeds.reshape(b, k, -1)[:, 0]  # A1111 pools the first chunk
    return Cond(torch.cat([p.to(parts[0].device) for p in parts], dim=-1), pooled)


def _per_sample(value, name: str) -> list[tuple[int, int]]:
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [(int(value[0]), int(value[1]))]
    pairs = [tuple(int(v) for v in pair) for pair in value]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{name}: expected (h, w) pairs, got {value!r}")
    return pairs


def sdxl_time_ids(original_hw, crop_top_left, target_hw, *, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """SDXL micro-conditioning [B, 6]: original h, w, crop top, left, target h, w.

    Each argument is one (a, b) pair for the whole batch or a list of pairs, one per sample.
    """
    cols = [_per_sample(v, n) for v, n in ((original_hw, "original_hw"), (crop_top_left, "crop_top_left"),
                                            (target_hw, "target_hw"))]
    batch = max(len(c) for c in cols)
    for c, name in zip(cols, ("original_hw", "crop_top_left", "target_hw"), strict=True):
        if len(c) not in (1, batch):
            raise ValueError(f"{name}: {len(c)} entries for a batch of {batch}")
    rows = [[*cols[0][i % len(cols[0])], *cols[1][i % len(cols[1])], *cols[2][i % len(cols[2])]] for i in range(batch)]
    return torch.tensor(rows, device=device, dtype=dtype)
