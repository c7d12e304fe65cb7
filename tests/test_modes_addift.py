"""ADDifT and Multi-ADDifT: the objective, the alternating steps, pairs, masks and the swap option."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.pairs import (PairBatches, change_map, encode_pairs, find_pairs, latent_mask, single_pair)
from trainer.data.scan import ImageItem
from trainer.data.text import TextCache
from trainer.training.engine import Trainer
from trainer.training.losses import DiffusionLoss
from trainer.config.params import ConfigError
from trainer.families.textenc import encode_prompts

from tests.enginekit import MemoryHost
from tests.modekit import (held_out, live_metric_at_save, loaded, mode_job, mse, pattern, record_unet_calls,
                           responsive_bundle, write_pair)

CPU = torch.device("cpu")


def addift_job(tmp_path, **over):
    orig, targ = write_pair(tmp_path / "pair")
    base = dict(diff_original_image=str(orig), diff_target_image=str(targ), train_iterations=4)
    base.update(over)
    return mode_job(tmp_path, "ADDifT", **base)


class Objective:
    """ADDifT's two objectives on held-out noise: forward (target -> original) and swapped."""

    def __init__(self, bundle, cfg):
        pair = single_pair(cfg, bundle, device=CPU, orig_caption="", targ_caption="")
        self.bundle = bundle
        noise, self.t = held_out((8, 4, 8, 8))
        add = bundle.noise_scheduler.add_noise
        self.x_orig = add(pair.origs.samples[0].latent[None].repeat(8, 1, 1, 1), noise, self.t)
        self.x_targ = add(pair.targs[0].latent[None].repeat(8, 1, 1, 1), noise, self.t)
        self.cond = encode_prompts(bundle, [""]).hidden.repeat(8, 1, 1)
        self.base_orig, self.base_targ = self.predict(self.x_orig), self.predict(self.x_targ)

    def predict(self, x):
        with torch.no_grad():
            return self.bundle.unet(x, self.t, self.cond).sample

    def __call__(self, net, m: float) -> tuple[float, float]:
        with net.scaled(m):
            return (mse(self.predict(self.x_targ), self.base_orig), mse(self.predict(self.x_orig), self.base_targ))


def test_addift_pulls_the_target_toward_the_original(tmp_path, logs, monkeypatch):
    host = MemoryHost(tmp_path / "out", bundle=responsive_bundle())
    cfg = addift_job(tmp_path, train_iterations=80, train_learning_rate=1e-2, train_snr_gamma=0.0)
    live_objective = Objective(host.bundle, cfg)
    live = live_metric_at_save(monkeypatch, lambda net: live_objective(net, 0.25)[0])
    result = Trainer(cfg, host, device="cpu").run()
    fresh = responsive_bundle()
    obj = Objective(fresh, cfg)
    start = mse(obj.base_targ, obj.base_orig)  # the network at 0
    with loaded(fresh, cfg, result.output) as (net,):
        forward, _ = obj(net, 0.25)
        backward_fwd, swapped = obj(net, -0.25)
    assert forward < 0.75 * start, (start, forward)      # target predicted like the original
    assert swapped < 0.8 * start, (start, swapped)       # and, negated, the original like the target
    assert backward_fwd > start                          # the direction is the one trained
    assert forward == pytest.approx(live[-1], rel=1e-4)  # the file holds the trained network


@pytest.mark.parametrize("alt,expected", [
    (1.0, [0.25, -0.25, 0.25, -0.25]),
    (2.0, [0.25, -0.5, 0.25, -0.5]),
    (0.0, [0.25, 0.25, 0.25, 0.25]),
])
def test_steps_alternate_with_the_base_unhooked_and_without_grad(tmp_path, logs, alt, expected):
    host = MemoryHost(tmp_path / "out")
    calls = record_unet_calls(host.bundle)
    Trainer(addift_job(tmp_path, diff_alt_ratio=alt), host, device="cpu").run()
    assert calls[0::2] == [(False, 0.0)] * 4  # base prediction: same U-Net, network unhooked, no graph
    assert calls[1::2] == [(True, m) for m in expected]


def test_negative_alt_ratio_feeds_noise_on_swapped_steps(tmp_path, logs):
    host = MemoryHost(tmp_path / "out")
    inputs = []
    host.bundle.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    Trainer(addift_job(tmp_path, diff_alt_ratio=-1.0, train_iterations=2), host, device="cpu").run()
    base1, net1, base2, net2 = inputs
    assert not torch.equal(base1, net1)  # step 1: noised original vs noised target
    assert torch.equal(base2, net2)      # step 2: the same noised noise on both sides


def test_revert_swaps_original_and_target_with_their_prompts(tmp_path, logs, monkeypatch):
    seen = []
    get = TextCache.get
    monkeypatch.setattr(TextCache, "get", lambda self, captions: seen.append(list(captions)) or get(self, captions))
    for revert in (False, True):
        seen.clear()
        cfg = addift_job(tmp_path, original_prompt="before", target_prompt="after", train_iterations=1,
                         diff_revert_original_target=revert, save_lora_name=f"r{revert}")
        Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu").run()
        base, net = seen
        assert (base, net) == ((["after"] * 2, ["before"] * 2) if revert else (["before"] * 2, ["after"] * 2))


def test_change_mask_marks_the_cells_that_differ():
    orig = torch.from_numpy(pattern((64, 64))).permute(2, 0, 1).float() / 127.5 - 1
    targ = torch.from_numpy(pattern((64, 64), patch=True)).permute(2, 0, 1).float() / 127.5 - 1
    mask = latent_mask(change_map(orig, targ), (8, 8))
    expected = torch.zeros(1, 8, 8)
    expected[:, 2:6, 2:6] = 1.0  # the 32x32 patch at (16, 16) covers latent cells 2..5
    assert torch.equal(mask, expected)
    for step, cells in ((3, 0), (4, 1)):  # 3 steps in each of R, G, B sum to 9 (below 10), 4 to 12
        nudged = orig.clone()
        nudged[:, 0, 0] += step / 127.5
        assert latent_mask(change_map(orig, nudged), (8, 8)).sum() == cells


def test_diff_mask_reaches_the_loss_only_when_asked(tmp_path, logs, monkeypatch):
    masks = []
    call = DiffusionLoss.__call__
    monkeypatch.setattr(DiffusionLoss, "__call__",
                        lambda self, pred, target, t, mask=None: masks.append(mask) or call(self, pred, target, t, mask))
    for use in (False, True):
        masks.clear()
        Trainer(addift_job(tmp_path, diff_use_diff_mask=use, train_iterations=2, save_lora_name=f"m{use}"),
                MemoryHost(tmp_path / "out"), device="cpu").run()
        if use:
            assert all(m.shape == (2, 1, 8, 8) and m[:, :, 2:6, 2:6].min() == 1 and m.sum() == 2 * 16 for m in masks)
        else:
            assert masks == [None, None]


# ---- Multi-ADDifT -----------------------------------------------------------------
def make_pair_folder(root, size=(64, 64)):
    for sub, stem in (("", "a"), ("more", "b")):
        folder = root / sub
        write_pair(folder, stem, size=size, target_suffix="_closed")
        (folder / f"{stem}.txt").write_text(f"{stem} open", encoding="utf-8")
        (folder / f"{stem}_closed.txt").write_text(f"{stem} closed", encoding="utf-8")
    Image.fromarray(pattern(size)).save(root / "lonely.png")  # no partner: not a pair
    return root


def test_find_pairs_matches_names_in_the_same_folder(tmp_path):
    root = make_pair_folder(tmp_path / "data")
    pairs = find_pairs(str(root), "_closed", trigger="tok")
    assert [(o.path.name, t.path.name) for o, t in pairs] == [("a.png", "a_closed.png"), ("b.png", "b_closed.png")]
    assert [(o.caption, t.caption) for o, t in pairs] == [("tok, a open", "tok, a closed"), ("tok, b open", "tok, b closed")]
    with pytest.raises(ConfigError, match="diff_target_name"):
        find_pairs(str(root), "")
    with pytest.raises(ConfigError, match="no image under .* has a partner named <name>_shut"):
        find_pairs(str(root), "_shut")


def test_pairs_share_bucket_crop_and_flip(tmp_path):
    root = tmp_path / "data"
    orig, targ = write_pair(root, "w", size=(96, 64), target_suffix="_t")
    cfg = mode_job(tmp_path, "Multi-ADDifT", lora_data_directory=str(root), diff_target_name="_t",
                   image_mirroring=True, image_size=[64, 64], image_min_length=64, image_buckets_step=64)
    from trainer.data.buckets import make_buckets

    bundle = responsive_bundle()
    buckets = make_buckets(cfg.image_size, 64, 64, 2.0, bundle.latent_multiple)
    data = encode_pairs([(ImageItem(orig, "o"), ImageItem(targ, "t"))], cfg, bundle, device=CPU, buckets=buckets)
    assert len(data) == 2  # the pair and its mirror
    for o, t, m in zip(data.origs.samples, data.targs, data.masks):
        assert (o.bucket, o.crop_top_left, o.mirrored) == (t.bucket, t.crop_top_left, t.mirrored)
        assert (o.caption, t.caption) == ("o", "t") and m.shape[-2:] == o.latent.shape[-2:]
    assert torch.equal(data.masks[1], torch.flip(data.masks[0], [-1]))
    batch = next(iter(PairBatches(data, 2, seed=1)))
    assert batch.orig.latents.shape == batch.targ.latents.shape and batch.mask.shape[0] == 2


def test_multi_addift_trains_on_the_folder(tmp_path, logs):
    root = make_pair_folder(tmp_path / "data")
    cfg = mode_job(tmp_path, "Multi-ADDifT", lora_data_directory=str(root), diff_target_name="_closed",
                   train_iterations=3, image_mirroring=True)
    result = Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu").run()
    assert result.status == "done" and result.output.is_file()
    from safetensors import safe_open
    import json

    with safe_open(str(result.output), "pt") as fh:
        tags = json.loads(fh.metadata()["ss_tag_frequency"])
    assert tags == {"data": {"a open": 2, "a closed": 2, "b open": 2, "b closed": 2}}


def test_multi_addift_refuses_pairs_of_different_sizes(tmp_path, logs):
    root = tmp_path / "data"
    write_pair(root, "a", target_suffix="_closed")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(root / "a_closed.png")
    cfg = mode_job(tmp_path, "Multi-ADDifT", lora_data_directory=str(root), diff_target_name="_closed")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu").run()
    assert "a_closed.png" in str(info.value) and "64x32" in str(info.value) and "64x64" in str(info.value)
