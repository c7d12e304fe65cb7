"""Dataset scan, image loading (modes, EXIF, broken files, bombs) and crop geometry."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import MAX_PIXELS, UnreadableImage, find_images, load_image, resize_cover_crop, scan_images
from trainer.data.buckets import make_buckets
from trainer.data.images import to_rgb
from trainer.data.variants import Variant, mask_at, render_variant
from trainer.config.params import ConfigError


def _png(path: Path, size=(8, 8), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---- scan ---------------------------------------------------------------------------
def test_recursive_scan_filters_and_sorts(tmp_path):
    for rel in ["b.png", "a.JPG", "sub/c.PNG", "sub/deeper/d.webp", "z.Bmp", "e.jpeg", "f.gif",
                "g.tif", "h.TIFF", "i.pcx", "j.ico"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in ["a.txt", "b.caption", "meta.json", ".hidden.png", ".cache/k.png", "sub/.x/l.png", "noext"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.JPG", "b.png", "e.jpeg", "f.gif", "g.tif", "h.TIFF", "i.pcx", "j.ico",
                     "sub/c.PNG", "sub/deeper/d.webp", "z.Bmp"]


@pytest.mark.parametrize("setup, problem", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: _png(p / "one.png"), "not a folder"),
    (lambda p: p, "no images"),
    (lambda p: (p / "notes.txt").write_text("x") and p, "no images"),
])
def test_scan_refuses_unusable_folders(tmp_path, setup, problem):
    folder = setup(tmp_path)
    with pytest.raises(ConfigError) as err:
        scan_images(folder)
    assert err.value.key == "lora_data_directory" and err.value.value == str(folder)
    assert problem in str(err.value)


def test_scan_empty_setting(tmp_path):
    with pytest.raises(ConfigError) as err:
        scan_images("  ")
    assert err.value.key == "lora_data_directory"


# ---- geometry -----------------------------------------------------------------------
@pytest.mark.parametrize("src, target, top_left", [
    ((100, 80), (128, 128), (0, 16)),  # landscape upscaled to 160x128, 16 cut each side
    ((80, 100), (64, 128), (0, 19)),   # portrait: 102x128 -> left (102-64)//2
    ((300, 100), (128, 64), (0, 32)),  # wider than target: 192x64
    ((64, 256), (64, 128), (64, 0)),   # taller: stays 64x256, centre 128 rows
    ((128, 64), (128, 64), (0, 0)),    # exact fit
])
def test_resize_cover_crop_geometry(src, target, top_left):
    out, offsets = resize_cover_crop(Image.new("RGB", src), *target)
    assert out.size == target
    assert offsets == top_left


def test_centre_crop_takes_the_middle():
    # A 30x10 image of three 10-px stripes: a square crop keeps the middle stripe.
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255
    out, (top, left) = resize_cover_crop(Image.fromarray(arr), 10, 10)
    assert (top, left) == (0, 10)
    assert np.asarray(out).min() == 255


def test_mirroring_flips_pixels_and_crop_left():
    arr = np.zeros((64, 100, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    img = Image.fromarray(arr)
    plain = render_variant(img, None, Variant((64, 64), 0, False))
    flipped = render_variant(img, None, Variant((64, 64), 0, True))
    assert torch.equal(flipped.tensor, plain.tensor.flip(-1))
    assert not torch.equal(flipped.tensor, plain.tensor)
    assert plain.crop_top_left == (0, 18) and flipped.crop_top_left == (0, 100 - 64 - 18)


def test_mask_follows_crop_and_mirror():
    alpha = torch.zeros(1, 64, 128)
    alpha[:, :, :64] = 1.0  # left half opaque
    img = Image.new("RGB", (128, 64))
    plain = render_variant(img, alpha, Variant((64, 64), 0, False))
    flipped = render_variant(img, alpha, Variant((64, 64), 0, True))
    m, mf = mask_at(plain.mask, (8, 8)), mask_at(flipped.mask, (8, 8))
    assert m.shape == (1, 8, 8) and 0 <= float(m.min()) and float(m.max()) <= 1
    assert torch.allclose(m[0, :, :4], torch.ones(8, 4), atol=1e-3)  # crop 32..96: left half opaque
    assert torch.allclose(m[0, :, 4:], torch.zeros(8, 4), atol=1e-3)
    assert torch.allclose(mf, m.flip(-1))


# ---- image modes --------------------------------------------------------------------
def _save(tmp_path, img: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_rgba_composites_on_white_and_gives_mask(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 2] = 255                 # blue
    arr[:2, :, 3] = 0                 # top: transparent
    arr[2:, :, 3] = 255               # bottom: opaque
    arr[3, 3, 3] = 51
    rgb, mask = load_image(_save(tmp_path, Image.fromarray(arr), "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((0, 2)) == (0, 0, 255)
    assert rgb.getpixel((3, 3)) == (204, 204, 255)  # 20% blue over white
    assert mask.shape == (1, 4, 4) and mask.dtype == torch.float32
    assert float(mask[0, 0, 0]) == 0 and float(mask[0, 2, 0]) == 1
    assert mask[0, 3, 3].item() == pytest.approx(0.2)


def test_opaque_alpha_gives_no_mask(tmp_path):
    rgb, mask = load_image(_save(tmp_path, Image.new("RGBA", (4, 4), (1, 2, 3, 255)), "a.png"))
    assert rgb.mode == "RGB" and mask is None and rgb.getpixel((1, 1)) == (1, 2, 3)


@pytest.mark.parametrize("make, name, pixel", [
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "cmyk.jpg", None),
    (lambda: Image.new("L", (4, 4), 77), "gray.png", (77, 77, 77)),
    (lambda: Image.new("1", (4, 4), 1), "bw.png", (255, 255, 255)),
    (lambda: Image.new("LA", (4, 4), (90, 255)), "la.png", (90, 90, 90)),
    (lambda: Image.new("RGB", (4, 4), (250, 0, 0)).convert("P"), "pal.gif", None),
    (lambda: Image.new("RGB", (4, 4), (0, 250, 0)), "a.bmp", (0, 250, 0)),
    (lambda: Image.new("RGB", (4, 4), (0, 0, 250)), "a.tiff", (0, 0, 250)),
    (lambda: Image.new("RGB", (4, 4), (9, 8, 7)), "a.pcx", (9, 8, 7)),
    (lambda: Image.new("RGB", (16, 16), (9, 8, 7)), "a.ico", (9, 8, 7)),
    (lambda: Image.new("RGB", (4, 4), (9, 8, 7)), "a.webp", None),
])
def test_modes_load_as_rgb(tmp_path, make, name, pixel):
    rgb, mask = load_image(_save(tmp_path, make(), name))
    assert rgb.mode == "RGB" and mask is None
    if pixel is not None:
        assert rgb.getpixel((1, 1)) == pixel
    if name == "cmyk.jpg":
        r, g, b = rgb.getpixel((1, 1))
        assert r > 200 and g < 60 and b < 60  # C0 M255 Y255 K0 is red
    if name == "pal.gif":
        assert rgb.getpixel((1, 1))[0] > 200


_DEEP = np.array([[0, 32896], [65535, 257]])
_DEEP_8BIT = [0, 128, 255, 1]


def _first_channel(rgb: Image.Image) -> list[int]:
    return [rgb.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1), (1, 1)]]


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    # Pillow 9.5 opens a 16-bit grey PNG as "I", newer Pillow as "I;16".
    img = Image.frombytes("I;16", (2, 2), _DEEP.astype("<u2").tobytes())
    rgb, mask = load_image(_save(tmp_path, img, "deep.png"))
    assert rgb.mode == "RGB" and mask is None
    assert _first_channel(rgb) == _DEEP_8BIT


def test_32bit_integer_mode_scaled_as_16bit():
    rgb, mask = to_rgb(Image.fromarray(_DEEP.astype(np.int32)))
    assert rgb.mode == "RGB" and mask is None and _first_channel(rgb) == _DEEP_8BIT


def test_palette_with_transparency_gives_mask(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    path = _save(tmp_path, img, "t.png", transparency=1)
    rgb, mask = load_image(path)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (200, 0, 0)
    assert float(mask[0, 0, 0]) == 0 and float(mask[0, 1, 1]) == 1


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees
    path = _save(tmp_path, img, "r.jpg", exif=exif.tobytes())
    rgb, _ = load_image(path)
    assert rgb.size == (20, 40)


# ---- broken files and bombs ---------------------------------------------------------
def test_broken_files_are_unreadable(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(b"\x00garbage" * 20)
    full = _save(tmp_path, Image.effect_noise((64, 64), 50).convert("RGB"), "full.png")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for path in (empty, noise, truncated):
        with pytest.raises(UnreadableImage, match=path.name):
            load_image(path)


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims a size; no pixel data (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_config_error(tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ConfigError) as err:
        load_image(bomb)
    assert err.value.key == "lora_data_directory" and err.value.value == str(bomb)


def test_bomb_guard_holds_when_pillow_limit_is_lifted(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some hosts turn Pillow's guard off
    bomb = _png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ConfigError, match="decompression-bomb"):
        load_image(bomb)
    assert 20000 * 20000 > MAX_PIXELS


def test_pixel_limit_parameter(tmp_path):
    path = _png(tmp_path / "a.png", size=(101, 100))
    assert load_image(path, max_pixels=10100)[0].size == (101, 100)
    with pytest.raises(ConfigError, match="10,100 pixels"):
        load_image(path, max_pixels=10100 - 1)


def test_buckets_for_tiny_model_multiple():
    # The tiny SD1 model needs multiples of 64 pixels; 128 step 64 gives these.
    b = make_buckets([128, 128], 64, 64, 2.0, multiple=64)
    assert b.main == [(64, 128), (128, 128), (128, 64)] and b.sub == [(64, 64)]
