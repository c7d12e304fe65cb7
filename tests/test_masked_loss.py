"""Masked loss: mask files and alpha reach the loss, through the same crops and flips as the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.data import build_latent_dataset, find_images, scan_images
from trainer.data.images import load_mask
from trainer.data.scan import mask_file
from trainer.training.engine import Trainer
from trainer.training.losses import DiffusionLoss
from trainer.config.params import ConfigError

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.tiny import tiny_bundle

CPU = torch.device("cpu")


def _mask(path, size, white_from_x: int) -> None:
    """A grayscale mask (width, height): black left of ``white_from_x``, white from there on."""
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[:, white_from_x:] = 255
    Image.fromarray(arr, "L").save(path)


def _rgb(path, size=(64, 64), alpha_left_clear: bool = False) -> None:
    arr = np.full((size[1], size[0], 4), 180, np.uint8)
    arr[..., 3] = 255
    if alpha_left_clear:
        arr[:, : size[0] // 2, 3] = 0
    Image.fromarray(arr, "RGBA").save(path)


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def test_mask_files_are_found_and_never_scanned_as_images(tmp_path):
    make_images(tmp_path, n=2)
    _mask(tmp_path / "img0_mask.png", (64, 64), 32)
    _mask(tmp_path / "img1_MASK.PNG", (64, 64), 32)
    _mask(tmp_path / "orphan_mask.png", (64, 64), 32)  # no image of its own: still not a training image
    assert [p.name for p in find_images(tmp_path)] == ["img0.png", "img1.png"]
    assert [i.path.name for i in scan_images(tmp_path)] == ["img0.png", "img1.png"]
    assert mask_file(tmp_path / "img0.png").name == "img0_mask.png"
    assert mask_file(tmp_path / "img1.png").name == "img1_MASK.PNG"
    assert mask_file(tmp_path / "orphan.png").name == "orphan_mask.png"
    (tmp_path / "img0_mask.png").unlink()
    assert mask_file(tmp_path / "img0.png") is None


def test_load_mask_is_gray_in_0_1_and_resized_to_its_image(tmp_path):
    arr = np.array([[0, 255], [128, 255]], np.uint8)
    Image.fromarray(arr, "L").convert("RGB").save(tmp_path / "m.png")  # an RGB mask counts as gray
    small = load_mask(tmp_path / "m.png", (2, 2))
    assert small.shape == (1, 2, 2) and torch.allclose(small[0], torch.tensor(arr / 255.0, dtype=torch.float32))
    _mask(tmp_path / "half.png", (16, 8), 8)
    big = load_mask(tmp_path / "half.png", (64, 32))
    assert big.shape == (1, 32, 64)
    assert big[0, :, :30].max() == 0 and big[0, :, 34:].min() == 1


def test_unreadable_mask_names_the_file(tmp_path):
    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as err:
        load_mask(tmp_path / "bad_mask.png", (8, 8))
    assert err.value.value == str(tmp_path / "bad_mask.png")


def test_mask_file_follows_resize_crop_and_mirror(bundle, tmp_path):
    # A 96x64 image goes to the 64x64 bucket: scale 1, centre crop of columns 16..79.
    _rgb(tmp_path / "wide.png", (96, 64), alpha_left_clear=True)
    _mask(tmp_path / "wide_mask.png", (48, 32), 32)  # half size; white from x=64 of the image
    cfg = quick_config(tmp_path, masked_loss=True, image_mirroring=True, image_max_ratio=1.0)
    plain, mirrored = build_latent_dataset(scan_images(tmp_path), cfg, bundle, device=CPU).samples
    assert plain.bucket == (64, 64) and plain.crop_top_left == (0, 16) and mirrored.mirrored
    # Crop columns 48..63 are white: latent columns 6 and 7 (8 pixels each); the file beats the alpha.
    # (Upscaling the half-size file softens its edge by a pixel: a few percent of a latent cell.)
    expected = torch.zeros(1, 8, 8)
    expected[..., 6:] = 1
    assert torch.allclose(plain.mask, expected, atol=0.05)
    assert torch.equal(mirrored.mask, plain.mask.flip(-1))


def test_without_masked_loss_the_mask_file_is_ignored_and_alpha_kept(bundle, tmp_path):
    _rgb(tmp_path / "a.png", alpha_left_clear=True)
    _rgb(tmp_path / "b.png")
    _mask(tmp_path / "b_mask.png", (64, 64), 32)
    off = build_latent_dataset(scan_images(tmp_path), quick_config(tmp_path), bundle, device=CPU).samples
    assert [s.source.name for s in off] == ["a.png", "b.png"]
    assert off[0].mask[..., :4].max() == 0 and off[0].mask[..., 4:].min() == 1  # alpha, as before
    assert off[1].mask is None
    on = build_latent_dataset(scan_images(tmp_path), quick_config(tmp_path, masked_loss=True), bundle,
                              device=CPU).samples
    assert torch.equal(on[1].mask, off[0].mask)  # b's file: black left half, like a's alpha


def test_half_black_mask_gives_the_mean_over_the_white_half():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., 4:] = 1
    loss = DiffusionLoss("MSE", torch.linspace(0.99, 0.01, 1000), snr_gamma=0, v_pred=False, device=CPU)
    t = torch.tensor([10, 500, 900])
    masked, per_sample = loss(pred, target, t, mask)
    white = (pred - target)[..., 4:].pow(2)
    assert torch.allclose(per_sample, white.mean(dim=(1, 2, 3)))
    assert torch.allclose(masked, white.mean())
    assert torch.allclose(loss(pred, target, t, torch.ones_like(mask))[0], loss(pred, target, t)[0])


def _masked_run(tmp_path, monkeypatch, name: str, white_from_x: int | None, masked: bool = True):
    """A 3-step LoRA run on two images (one with a mask file); the masks the loss saw, and the result."""
    data = make_images(tmp_path / f"data_{name}", n=2)
    if white_from_x is not None:
        _mask(data / "img0_mask.png", (64, 64), white_from_x)
    seen = []
    call = DiffusionLoss.__call__
    monkeypatch.setattr(DiffusionLoss, "__call__",
                        lambda self, pred, target, t, mask=None: seen.append(mask) or call(self, pred, target, t, mask))
    cfg = quick_config(data, masked_loss=masked, train_iterations=3, save_lora_name=name)
    result = Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu").run()
    assert result.status == "done" and result.steps == 3
    return seen, result


def test_masked_lora_run_weights_the_loss_and_trains(tmp_path, logs, monkeypatch):
    seen, result = _masked_run(tmp_path, monkeypatch, "half", 32)
    for m in seen:  # img0 masked on its left half, img1 (no mask) everywhere
        assert m.shape == (2, 1, 8, 8) and sorted(float(x.sum()) for x in m) == [32.0, 64.0]
    ups = [v for k, v in load_file(result.output).items() if "lora_up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # lora_up starts at zero: it trained
    assert np.isfinite(result.loss_first) and np.isfinite(result.loss_last)
    _, plain = _masked_run(tmp_path, monkeypatch, "plain", None, masked=False)
    _, white = _masked_run(tmp_path, monkeypatch, "white", 0)
    assert white.loss_first == pytest.approx(plain.loss_first, rel=1e-5)  # an all-white mask changes nothing
    assert result.loss_first != pytest.approx(plain.loss_first, rel=1e-3)  # same seed, half mask: another loss


def test_alpha_does_not_reach_the_loss_without_masked_loss(tmp_path, logs, monkeypatch):
    data = tmp_path / "alpha"
    data.mkdir()
    _rgb(data / "a.png", alpha_left_clear=True)
    _rgb(data / "b.png", alpha_left_clear=True)
    seen = []
    call = DiffusionLoss.__call__
    monkeypatch.setattr(DiffusionLoss, "__call__",
                        lambda self, pred, target, t, mask=None: seen.append(mask) or call(self, pred, target, t, mask))
    cfg = quick_config(data, train_iterations=2)
    assert Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu").run().status == "done"
    assert seen == [None, None]
