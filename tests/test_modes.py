"""iLECO, Difference and ADDifT learn what they claim, on tiny models, through the one engine."""
from __future__ import annotations

import gc
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from trainer.data.pairs import single_pair
from trainer.training.engine import Trainer
from trainer.networks.network import Network
from trainer.config.params import ConfigError
from trainer.families.textenc import encode_prompts

from tests.enginekit import MemoryHost
from tests.modekit import (held_out, live_metric_at_save, loaded, mode_job as job, mse, record_unet_calls,
                           responsive_bundle, write_pair)

CPU = torch.device("cpu")


# ---- iLECO -----------------------------------------------------------------------
def ileco_gap(bundle, network=None) -> float:
    """Held-out ‖ε̂_net(z, t, c_orig) − ε̂_base(z, t, c_target)‖² (the network as it is applied now)."""
    z, t = held_out((8, 4, 8, 8))
    hidden = encode_prompts(bundle, ["a cat", ""]).hidden
    orig, targ = hidden[:1].repeat(8, 1, 1), hidden[1:].repeat(8, 1, 1)
    with torch.no_grad():
        if network is not None:
            with network.disabled():
                base = bundle.unet(z, t, targ).sample
        else:
            base = bundle.unet(z, t, targ).sample
        return mse(bundle.unet(z, t, orig).sample, base)


def test_ileco_moves_the_concept_and_the_file_reproduces_it(tmp_path, logs, monkeypatch):
    host = MemoryHost(tmp_path / "out", bundle=responsive_bundle())
    cfg = job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", train_iterations=40,
              train_learning_rate=1e-3)
    start = ileco_gap(host.bundle)
    live = live_metric_at_save(monkeypatch, lambda net: ileco_gap(host.bundle, net))
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.output.is_file()
    fresh = responsive_bundle()
    with loaded(fresh, cfg, result.output) as (net,):
        from_file = ileco_gap(fresh, net)
    assert from_file ** 0.5 < 0.5 * start ** 0.5, (start, from_file)  # the norm at least halves
    assert from_file == pytest.approx(live[-1], rel=1e-4, abs=1e-9)


def unet_count() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), UNet2DConditionModel))


def test_ileco_base_prediction_is_the_same_unet_unhooked_without_grad(tmp_path, logs):
    host = MemoryHost(tmp_path / "out", bundle=responsive_bundle())
    calls = record_unet_calls(host.bundle)
    before, during = unet_count(), []
    cfg = job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="a dog", train_iterations=3)
    Trainer(cfg, host, device="cpu",
            listeners=[lambda p: during.append(unet_count()) if p.phase == "training" and p.step == 2 else None]).run()
    assert calls == [(False, 0.0), (True, 1.0)] * 3
    assert during and set(during) == {before}  # no second U-Net exists while training


def test_ileco_trains_the_size_as_given_and_encodes_prompts_once(tmp_path, logs, monkeypatch):
    import trainer.families.textenc as textenc

    host = MemoryHost(tmp_path / "out", bundle=responsive_bundle())
    shapes, encoded = [], []
    host.bundle.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    real = textenc.encode_prompts
    monkeypatch.setattr(textenc, "encode_prompts", lambda b, prompts, **kw: encoded.append(list(prompts)) or real(b, prompts, **kw))
    cfg = job(tmp_path, "iLECO", original_prompt="a cat", target_prompt="", image_size=[64, 128], train_iterations=3)
    Trainer(cfg, host, device="cpu").run()
    assert set(shapes) == {(2, 4, 8, 16)}  # height 64, width 128: latents [B, 4, h/8, w/8]
    assert encoded == [["a cat", ""]]


def test_ileco_needs_an_original_prompt(tmp_path, logs):
    host = MemoryHost(tmp_path / "out")
    with pytest.raises(ConfigError, match="original prompt"):
        Trainer(job(tmp_path, "iLECO", original_prompt="  "), host, device="cpu").run()
    assert host.sessions == 0  # refused before the model is touched


# ---- Difference ------------------------------------------------------------------------
def denoise_losses(bundle, cfg, prompt: str = "face") -> dict[str, float]:
    """Held-out denoising MSE on the original and the target image."""
    pair = single_pair(cfg, bundle, device=CPU, orig_caption=prompt, targ_caption=prompt)
    noise, t = held_out((8, 4, 8, 8))
    hidden = encode_prompts(bundle, [prompt]).hidden.repeat(8, 1, 1)
    out = {}
    for name, sample in (("orig", pair.origs.samples[0]), ("targ", pair.targs[0])):
        latents = sample.latent[None].repeat(8, 1, 1, 1)
        with torch.no_grad():
            pred = bundle.unet(bundle.noise_scheduler.add_noise(latents, noise, t), t, hidden).sample
        out[name] = mse(pred, noise)
    return out


def difference_job(tmp_path, **over):
    orig, targ = write_pair(tmp_path / "pair")
    base = dict(diff_original_image=str(orig), diff_target_image=str(targ), original_prompt="face",
                train_iterations=40, train_learning_rate=1e-2, train_snr_gamma=0.0, diff_save_1st_pass=True)
    base.update(over)
    return job(tmp_path, "Difference", **base)


def test_difference_second_network_learns_the_target(tmp_path, logs):
    host = MemoryHost(tmp_path / "out", bundle=responsive_bundle())
    cfg = difference_job(tmp_path)
    result = Trainer(cfg, host, device="cpu").run()
    copier, diff = tmp_path / "out" / "difference_copy.safetensors", tmp_path / "out" / "difference.safetensors"
    assert result.output == diff and [p.name for p in result.saved] == [copier.name, diff.name]
    fresh = responsive_bundle()
    with loaded(fresh, cfg, copier):
        a = denoise_losses(fresh, cfg)
    with loaded(fresh, cfg, copier, diff):
        ab = denoise_losses(fresh, cfg)
    assert ab["targ"] < 0.95 * a["targ"], (a, ab)
    # B learned what differs: it helps the target more than the original
    assert ab["targ"] / a["targ"] < ab["orig"] / a["orig"], (a, ab)
    # B alone is in the file: the U-Net modules of a plain network, no copier inside
    probe = Network.build(fresh, cfg)
    try:
        expected = set(probe.state_dict_kohya())
    finally:
        probe.remove()
    assert set(load_file(str(diff))) == expected
    assert not any(k.startswith("lora_te") for k in expected)
    assert not torch.equal(load_file(str(diff))[sorted(expected)[1]], load_file(str(copier))[sorted(expected)[1]])


def test_difference_logs_both_passes(tmp_path, logs):
    host = MemoryHost(tmp_path / "out")
    result = Trainer(difference_job(tmp_path, train_iterations=2, diff_save_1st_pass=False), host,
                     device="cpu").run()
    assert [p.name.endswith("_copy.csv") for p in result.logs] == [True, False]
    assert not (tmp_path / "out" / "difference_copy.safetensors").exists()
    assert [p.name for p in result.saved] == ["difference.safetensors"]


def test_loading_the_first_pass_gives_the_same_second_network(tmp_path, logs):
    first = MemoryHost(tmp_path / "a")
    cfg = difference_job(tmp_path, train_iterations=4)
    Trainer(cfg, first, device="cpu").run()
    second = MemoryHost(tmp_path / "b")
    copier = tmp_path / "a" / "difference_copy.safetensors"
    result = Trainer(cfg.with_overrides({"diff_load_1st_pass": str(copier), "diff_save_1st_pass": False}), second,
                     device="cpu").run()
    assert [p.name for p in result.saved] == ["difference.safetensors"]
    trained, reloaded = load_file(str(tmp_path / "a" / "difference.safetensors")), load_file(str(result.output))
    assert trained.keys() == reloaded.keys()
    for key in trained:
        torch.testing.assert_close(reloaded[key], trained[key], rtol=1e-5, atol=1e-6)


def test_first_pass_only_saves_the_copier(tmp_path, logs):
    host = MemoryHost(tmp_path / "out")
    result = Trainer(difference_job(tmp_path, train_iterations=2, diff_save_1st_pass=False, diff_1st_pass_only=True),
                     host, device="cpu").run()
    assert result.output == tmp_path / "out" / "difference_copy.safetensors" and result.output.is_file()
    assert not (tmp_path / "out" / "difference.safetensors").exists()
    assert len(result.logs) == 1 and result.logs[0].name.endswith("_copy.csv")


def test_second_pass_settings_apply_to_pass_two_only(tmp_path, logs):
    host = MemoryHost(tmp_path / "out")
    cfg = difference_job(tmp_path, train_iterations=3, use_2nd_pass_settings=True).with_overrides(
        {"2nd pass": {"network_rank": "2", "train_iterations": "2", "save_lora_name": "ignored"}})
    totals = []
    result = Trainer(cfg, host, device="cpu",
                     listeners=[lambda p: totals.append((p.pass_index, p.total)) if p.phase == "training" else None]).run()
    assert dict(totals) == {1: 3, 2: 2}
    copier, diff = load_file(str(tmp_path / "out" / "difference_copy.safetensors")), load_file(str(result.output))
    assert {v.shape[0] for k, v in diff.items() if k.endswith("lora_down.weight")} == {2}
    assert {v.shape[0] for k, v in copier.items() if k.endswith("lora_down.weight")} == {4}
    assert result.output.name == "difference.safetensors"  # the name stays pass 1's


@pytest.mark.parametrize("over,key,fragment", [
    ({"diff_target_image": ""}, "diff_target_image", "no image given"),
    ({"diff_target_image": "/nonexistent/t.png"}, "diff_target_image", "does not exist"),
    ({"diff_load_1st_pass": "x", "diff_1st_pass_only": True}, "diff_1st_pass_only", "nothing to train"),
])
def test_difference_refuses_bad_pairs_before_loading(tmp_path, logs, over, key, fragment):
    host = MemoryHost(tmp_path / "out")
    with pytest.raises(ConfigError) as info:
        Trainer(difference_job(tmp_path, **over), host, device="cpu").run()
    assert info.value.key == key and fragment in str(info.value)
    assert host.sessions == 0


def test_pair_sizes_must_match_and_the_error_names_both(tmp_path, logs):
    orig, _ = write_pair(tmp_path / "a", size=(64, 64))
    _, targ = write_pair(tmp_path / "b", size=(64, 128))
    for mode in ("Difference", "ADDifT"):
        with pytest.raises(ConfigError) as info:
            Trainer(job(tmp_path, mode, diff_original_image=str(orig), diff_target_image=str(targ)),
                    MemoryHost(tmp_path / "out"), device="cpu").run()
        assert info.value.key == "diff_target_image"
        assert "64x128" in str(info.value) and "64x64" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("mode", ["iLECO", "Difference", "ADDifT", "Multi-ADDifT"])
def test_every_mode_trains_every_family(tmp_path, logs, mode, family):
    orig, targ = write_pair(tmp_path / "pair", target_suffix="_t")
    cfg = job(tmp_path, mode, train_iterations=2, original_prompt="a cat", diff_original_image=str(orig),
              diff_target_image=str(targ), lora_data_directory=str(tmp_path / "pair"), diff_target_name="_t")
    host = MemoryHost(tmp_path / "out", family=family)
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 2 and result.output.is_file()
    assert math.isfinite(result.loss_first) and math.isfinite(result.loss_last)
