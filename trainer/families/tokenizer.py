"""The CLIP BPE tokenizer, rebuilt offline from bpe_simple_vocab_16e6.txt.gz.

The vocabulary ships inside the open_clip and clip packages; install.py puts a
copy in the cache when neither is installed. Nothing is downloaded here.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..paths import cache_dir

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48894  # 49408 tokens = 256 bytes * 2 + merges + 2 specials


class TokenizerMissing(RuntimeError):
    """No CLIP vocabulary on this machine."""


def _package_file(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / VOCAB_NAME
        if candidate.is_file():
            return candidate
    return None


def find_bpe_file() -> Path:
    """The vocabulary: our cache first, then the open_clip or clip package."""
    cached = cache_dir() / "clip" / VOCAB_NAME
    if cached.is_file():
        return cached
    for package in ("open_clip", "clip"):
        try:
            found = _package_file(package)
        except (ImportError, ValueError):
            found = None
        if found:
            return found
    raise TokenizerMissing(
        f"The CLIP vocabulary ({VOCAB_NAME}) was not found in {cached.parent} or in an installed "
        "open_clip/clip package. Run `python install.py` once to put it in place."
    )


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_vocab_files(bpe_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the transformers format) from the BPE file."""
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    units = _bytes_to_unicode()
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def vocab_files() -> tuple[Path, Path]:
    """vocab.json and merges.txt in the cache, built on first use."""
    out = cache_dir() / "clip"
    vocab, merges = out / "vocab.json", out / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        vocab, merges = build_vocab_files(find_bpe_file(), out)
    return vocab, merges


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer; SD1 and SDXL's first encoder pad with <|endoftext|>, OpenCLIP ones with '!'."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_files()
    # Positional paths work on transformers 4 and 5 alike (keywords differ).
    return CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=77)
