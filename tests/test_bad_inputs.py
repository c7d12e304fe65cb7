"""Bad inputs are refused clearly, write nothing, and leave the process able to train.

One table: each row makes a bad input, feeds it to an entry point (the CLI, the Trainer on an
in-memory model, the preset loader, the log picker or the model loader) and expects the field
it names and a piece of the refused value. Every row also checks that nothing under its tmp
folder appeared or changed (an existing ``tiny.safetensors`` with ``save_overwrite`` on stays as
it was) and then trains a small job in the same process on the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from tests.badinputkit import ENTRIES, EXISTING, NAME, Ctx, corrupt, empty, fingerprint, png, snapshot, train_once
from tests.badinputrows import TABLE
from tests.enginekit import make_images
from tests.ldm_export import write_single_file
from tests.tiny import tiny_bundle


@pytest.fixture(scope="module")
def bundle():
    """One model per worker, shared by every row and every health check."""
    return tiny_bundle("sd1")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return write_single_file(tiny_bundle("sd1"), tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors")


@pytest.fixture()
def ctx(tmp_path, logs, bundle, model_file):
    with pytest.MonkeyPatch.context() as mp:
        out = tmp_path / "lora"
        out.mkdir()
        (out / f"{NAME}.safetensors").write_bytes(EXISTING)
        yield Ctx(tmp_path, make_images(tmp_path / "data", n=2), out, logs, bundle, model_file, mp)


def _fragments(made: tuple[Any, tuple[str, ...]]) -> tuple[str, ...]:
    assert made[1] and all(isinstance(f, str) and f for f in made[1]), made[1]
    return made[1]


@pytest.mark.parametrize("entry,make,field", TABLE)
def test_bad_input_is_refused_and_nothing_is_written(ctx: Ctx, entry: str, make: Callable, field: str) -> None:
    model_before = fingerprint(ctx.bundle)
    made = make(ctx)
    before = snapshot(ctx.tmp)
    key, message = ENTRIES[entry](ctx, made[0])
    ctx.mp.undo()  # back to the real os.scandir / Pillow limit before looking around
    assert key == field, message
    for fragment in _fragments(made):
        assert fragment in message, (fragment, message)
    assert snapshot(ctx.tmp) == before  # nothing appeared, changed or vanished, outputs and logs included
    assert (ctx.out / f"{NAME}.safetensors").read_bytes() == EXISTING and not (ctx.tmp / "pwned").exists()
    assert fingerprint(ctx.bundle) == model_before  # no hook left behind, no weight touched
    train_once(ctx, ctx.tmp / "healthy")  # and the same process, on the same model, still trains


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [p.id for p in TABLE]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


# ---- images that look odd but must train ----------------------------------------------------------
def _odd(folder: Path, mode: str) -> Path:
    """One 64x64 image in `mode` (palette with a transparent index; alpha modes with a ramp of alpha)."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = folder / ("img.jpg" if mode == "CMYK" else "img.png")
    if mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=90)
    elif mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(path)
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, transparency=0)
    else:
        img = rgb.convert(mode)
        img.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))))
        img.save(path)
    return path


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA"])
def test_unusual_image_modes_train(ctx: Ctx, mode: str) -> None:
    """CMYK JPEG, 16-bit grayscale, palette with transparency, RGBA and LA: the only image trains."""
    path = _odd(ctx.folder("odd"), mode)
    with Image.open(path) as img:  # 16-bit PNGs open as "I" in older Pillow
        assert img.mode == mode or (mode, img.mode) == ("I;16", "I")
        assert mode != "P" or "transparency" in img.info
    train_once(ctx, ctx.tmp / "odd-out", name="odd", data=path.parent)  # nothing else to train on


def test_bad_images_among_good_ones_are_left_out(ctx: Ctx, caplog) -> None:
    """Corrupt, empty and 1x1 files are skipped with a warning naming each; the good images train."""
    bad = [corrupt(ctx.data / "bad.png"), empty(ctx.data / "zero.jpg"), png(ctx.data / "dot.png", size=(1, 1))]
    train_once(ctx, ctx.tmp / "mixed", name="mixed")
    for path in bad:
        assert f"skipping {path}" in caplog.text or f"skipping unreadable image {path}" in caplog.text
