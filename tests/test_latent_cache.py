"""Latent cache on the tiny SD1 model: one VAE pass per variant, exact latents, stopping."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.data import Stopped, build_latent_dataset, load_image, resize_cover_crop, scan_images
from trainer.data.cache import vae_for_encoding
from trainer.config.params import ConfigError

CPU = torch.device("cpu")


def _cfg(size: int = 64, **kw) -> TrainConfig:
    """Settings for the tiny model; 64 gives one bucket, 128 gives 128/64-sided main buckets."""
    base = {"image_size(height, width)": str(size), "image_buckets_step": 64, "image_min_length": 64,
            "image_max_ratio": 2}
    return TrainConfig.from_dict({**base, **kw})


def _img(path: Path, size, seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode != "RGB" else Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def bundle():
    return tiny_bundle("sd1")


@pytest.fixture
def folder(tmp_path):
    _img(tmp_path / "wide.png", (120, 70), seed=1)
    _img(tmp_path / "sq.png", (96, 100), seed=2)
    _img(tmp_path / "sub" / "tall.png", (64, 130), seed=3)
    (tmp_path / "sq.txt").write_text("square one", encoding="utf-8")
    return tmp_path


class CountingEncode:
    """Wraps vae.encode to count calls and images."""

    def __init__(self, vae):
        self.inner, self.calls, self.images = vae.encode, 0, 0
        vae.encode = self

    def __call__(self, x, *args, **kw):
        self.calls += 1
        self.images += x.shape[0]
        return self.inner(x, *args, **kw)


def _expected(bundle, sample) -> torch.Tensor:
    """Encode the sample's source directly: cover-crop, mirror, mean x scale."""
    rgb, _ = load_image(sample.source)
    img, _ = resize_cover_crop(rgb, *sample.bucket)
    if sample.mirrored:
        img = ImageOps.mirror(img)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        mean = bundle.vae.encode(x).latent_dist.mean[0]
    return (mean - bundle.vae_shift) * bundle.vae_scale


def test_vae_runs_once_per_variant_and_latents_match(bundle, folder):
    counter = CountingEncode(bundle.vae)
    items = scan_images(folder, trigger="tw")
    data = build_latent_dataset(items, _cfg(128, sub_image_num=1, image_mirroring=True), bundle, device=CPU,
                                encode_batch=2)
    assert len(data) == 3 * 2 * 2 == counter.images  # 3 images x (main + 1 sub) x mirror
    assert counter.calls == 6  # per bucket in pairs: 4 in 128x128, 4 in 64x64, 2 in 128x64, 2 in 64x128
    bundle.vae.encode = counter.inner
    for s in data.samples:
        assert s.latent.shape == (4, s.bucket[1] // 8, s.bucket[0] // 8)
        assert s.latent.device == CPU and s.latent.dtype == torch.float32
        assert torch.allclose(s.latent, _expected(bundle, s), atol=1e-5)
    captions = {s.source.name: s.caption for s in data.samples}
    assert captions == {"wide.png": "tw", "sq.png": "tw, square one", "tall.png": "tw"}


def test_sample_geometry_and_sub_buckets(bundle, folder):
    data = build_latent_dataset(scan_images(folder), _cfg(128, sub_image_num=1), bundle, device=CPU)
    by = {(s.source.name, s.sub_index): s for s in data.samples}
    assert [(s.source.name, s.sub_index) for s in data.samples] == [
        ("sq.png", 0), ("sq.png", 1), ("tall.png", 0), ("tall.png", 1), ("wide.png", 0), ("wide.png", 1)]
    wide = by["wide.png", 0]
    assert wide.bucket == (128, 64) and wide.original_size == (70, 120) and wide.target_size == (64, 128)
    assert wide.crop_top_left == (5, 0)  # 120x70 covers 128x64 at 128x75 (rounded): (75-64)//2
    assert by["tall.png", 0].bucket == (64, 128) and by["sq.png", 0].bucket == (128, 128)
    for name in ("wide.png", "sq.png", "tall.png"):
        main, sub = by[name, 0], by[name, 1]
        assert sub.bucket in data.buckets.sub
        assert sub.bucket[0] * sub.bucket[1] < main.bucket[0] * main.bucket[1]


def test_vae_shift_applied_before_scale(bundle, folder):
    bundle.vae.register_to_config(shift_factor=0.25)
    assert bundle.vae_shift == 0.25
    data = build_latent_dataset(scan_images(folder), _cfg(), bundle, device=CPU)
    for s in data.samples:
        assert torch.allclose(s.latent, _expected(bundle, s), atol=1e-5)


def test_progress_and_stop(bundle, folder):
    seen = []
    build_latent_dataset(scan_images(folder), _cfg(), bundle, device=CPU, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    counter = CountingEncode(bundle.vae)
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Stopped):
        build_latent_dataset(scan_images(folder), _cfg(), bundle, device=CPU, should_stop=stop_after_two,
                             encode_batch=8)
    assert len(calls) == 3 and counter.images == 0  # stopped before the third image, nothing encoded


def test_broken_images_skipped_and_counted(bundle, tmp_path, caplog):
    _img(tmp_path / "good.png", (64, 64))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = build_latent_dataset(scan_images(tmp_path), _cfg(), bundle, device=CPU)
    assert len(data) == 1 and data.images == 1
    assert sorted(p.name for p in data.skipped) == ["bad.png", "empty.jpg"]
    assert "empty.jpg" in caplog.text and "bad.png" in caplog.text


def test_nothing_usable_is_config_error(bundle, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "zero.png").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        build_latent_dataset(scan_images(tmp_path), _cfg(), bundle, device=CPU)
    assert err.value.key == "lora_data_directory" and err.value.value == str(tmp_path)
    assert "2 unreadable" in str(err.value)
    with pytest.raises(ConfigError) as err:  # the configured folder is named when known
        build_latent_dataset(scan_images(tmp_path), _cfg(lora_data_directory="/data/set"), bundle, device=CPU)
    assert err.value.value == "/data/set"


def test_disable_upscale_skips_small_images(bundle, tmp_path, caplog):
    _img(tmp_path / "big.png", (70, 65))
    _img(tmp_path / "small.png", (64, 60))
    data = build_latent_dataset(scan_images(tmp_path), _cfg(image_disable_upscale=True), bundle, device=CPU)
    assert [s.source.name for s in data.samples] == ["big.png"]
    assert [p.name for p in data.not_upscaled] == ["small.png"] and "small.png" in caplog.text
    data = build_latent_dataset(scan_images(tmp_path), _cfg(), bundle, device=CPU)
    assert len(data) == 2
    (tmp_path / "big.png").unlink()
    with pytest.raises(ConfigError, match="1 smaller than their bucket"):
        build_latent_dataset(scan_images(tmp_path), _cfg(image_disable_upscale=True), bundle, device=CPU)


def test_alpha_becomes_latent_mask(bundle, tmp_path):
    arr = np.full((64, 64, 4), 200, np.uint8)
    arr[:, :32, 3] = 0
    arr[:, 32:, 3] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    data = build_latent_dataset(scan_images(tmp_path), _cfg(image_mirroring=True), bundle, device=CPU)
    plain, mirrored = data.samples
    assert plain.mask.shape == (1, 8, 8) and plain.mask.dtype == torch.float32
    assert torch.equal(plain.mask[0, :, :4], torch.zeros(8, 4)) and torch.equal(plain.mask[0, :, 4:], torch.ones(8, 4))
    assert torch.equal(mirrored.mask, plain.mask.flip(-1))


def test_bf16_encodes_a_copy_and_leaves_vae_alone(bundle, folder):
    before = {k: v.clone() for k, v in bundle.vae.state_dict().items()}
    ref = build_latent_dataset(scan_images(folder), _cfg(), bundle, device=CPU)
    low = build_latent_dataset(scan_images(folder), _cfg(train_VAE_precision="bf16"), bundle, device=CPU)
    for k, v in bundle.vae.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    for a, b in zip(ref.samples, low.samples):
        assert b.latent.dtype == torch.float32
        assert not torch.equal(a.latent, b.latent)  # really ran in bf16
        assert torch.allclose(a.latent, b.latent, atol=0.1, rtol=0.05)


def test_vae_for_encoding_restores_half_vae(bundle):
    vae = bundle.vae.half()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with vae_for_encoding(vae, CPU, torch.float32) as used:
        assert used is vae and next(used.parameters()).dtype == torch.float32
    for k, v in vae.state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, before[k])


def test_non_finite_latents_are_config_error(bundle, folder):
    inner = bundle.vae.encode

    def nan_encode(x):
        out = inner(x)
        out.latent_dist.mean.fill_(float("nan"))
        return out

    bundle.vae.encode = nan_encode
    with pytest.raises(ConfigError) as err:
        build_latent_dataset(scan_images(folder), _cfg(), bundle, device=CPU)
    assert err.value.key == "train_VAE_precision" and err.value.value == "fp32"
