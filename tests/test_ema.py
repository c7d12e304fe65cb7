"""ema_decay: an EMA of the network weights, saved in place of the raw ones; training goes on raw."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer.config.schema import TrainConfig
from trainer.training.ema import EmaWeights, warmup_decay
from trainer.training.engine import Trainer
from trainer.networks.network import Network
from trainer.config.params import ConfigError
from trainer.training.runlog import read_log

from tests.enginekit import MemoryHost, make_images, quick_config


def _hand_ema(trajectory: list[list[torch.Tensor]], decay: float) -> list[list[torch.Tensor]]:
    """EMA after each step of a recorded trajectory (index 0: the weights before step 1)."""
    shadow = [t.double() for t in trajectory[0]]
    out = [[s.clone() for s in shadow]]
    for t, weights in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        shadow = [d * s + (1 - d) * w.double() for s, w in zip(shadow, weights)]
        out.append([s.clone() for s in shadow])
    return out


def test_warmup_decay_follows_the_formula():
    assert warmup_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.999, 90) == pytest.approx(91 / 100)
    assert warmup_decay(0.9, 1000) == 0.9  # the warm-up ends once (1+t)/(10+t) passes the decay


def test_shadow_equals_a_hand_computed_ema_and_keeps_fp32():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen).half()), torch.nn.Parameter(torch.randn(5))]
    ema = EmaWeights(params, 0.95)
    trajectory = [[p.detach().clone() for p in params]]
    for _ in range(12):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        ema.update()
        trajectory.append([p.detach().clone() for p in params])
    want = _hand_ema(trajectory, 0.95)[-1]
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    for s, w in zip(ema.shadow, want):
        assert torch.allclose(s.double(), w, atol=1e-5)
    raw = [p.detach().clone() for p in params]
    with ema.applied():
        assert all(torch.equal(p, s.to(p.dtype)) for p, s in zip(params, ema.shadow))
    assert all(torch.equal(p, r) for p, r in zip(params, raw))  # the raw weights are back


def test_state_dict_round_trip_and_refusals():
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    ema = EmaWeights(params, 0.5)
    with torch.no_grad():
        params[0].fill_(3.0)
    ema.update()
    other = EmaWeights([torch.nn.Parameter(torch.zeros(2, 2))], 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.step == 1 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="shape"):
        EmaWeights([torch.nn.Parameter(torch.zeros(3))], 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="holds 1 tensors"):
        EmaWeights([torch.nn.Parameter(torch.zeros(2, 2))] * 2, 0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError):
        EmaWeights(params, 1.0)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_an_ema_decay_outside_0_1_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError) as err:
        quick_config(tmp_path, ema_decay=bad).validate()
    assert err.value.key == "ema_decay"
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"ema_decay": 1.0})
    assert err.value.key == "ema_decay"
    assert quick_config(tmp_path, ema_decay=0.999).validate().ema_decay == 0.999


@pytest.fixture
def recorded(monkeypatch):
    """Every AdamW step's weights (before and after) and every saved file's network."""
    rec = {"before": [], "after": [], "saves": {}}
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        rec["before"].append([p.detach().clone() for p in params])
        out = step(self, *args, **kwargs)
        rec["after"].append([p.detach().clone() for p in params])
        rec["params"] = params
        return out

    save = Network.save

    def recording_save(self, path, **kwargs):
        rec["names"] = {id(p): n for n, p in self.lyco.named_parameters()}
        rec["saves"][path.name] = len(rec["after"])  # the step it was saved at
        return save(self, path, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(Network, "save", recording_save)
    return rec


def test_saved_files_hold_the_ema_and_training_goes_on_raw(tmp_path, logs, recorded):
    data = make_images(tmp_path / "data", n=4)
    cfg = quick_config(data, train_iterations=6, save_per_steps=3, ema_decay=0.8, train_optimizer="AdamW",
                       train_learning_rate=1e-2)
    result = Trainer(cfg, MemoryHost(tmp_path / "lora"), device="cpu").run()
    assert result.status == "done" and recorded["saves"] == {"tiny_3steps.safetensors": 3, "tiny.safetensors": 6}
    trajectory = [recorded["before"][0], *recorded["after"]]
    hand = _hand_ema(trajectory, 0.8)
    names = [recorded["names"][id(p)] for p in recorded["params"]]
    for file, step in recorded["saves"].items():
        saved = load_file(str(tmp_path / "lora" / file))
        for i, name in enumerate(names):
            assert torch.allclose(saved[name].double(), hand[step][i], atol=1e-6), (file, name)
        moved = [i for i in range(len(names)) if not torch.allclose(hand[step][i], trajectory[step][i].double())]
        assert moved  # the EMA differs from the raw weights, so the comparison above tells them apart
    # step 4 starts from the raw weights of step 3, not from the EMA swapped in for the save
    assert all(torch.equal(a, b) for a, b in zip(recorded["before"][3], recorded["after"][2]))
    header, frame = read_log(result.logs[0])
    assert header["ema_decay"] == "0.8" and list(frame["Step"]) == list(range(1, 7))


def test_without_ema_the_file_holds_the_raw_weights(tmp_path, logs, recorded):
    data = make_images(tmp_path / "data", n=4)
    result = Trainer(quick_config(data, train_iterations=3, train_optimizer="AdamW"), MemoryHost(tmp_path / "lora"),
                     device="cpu").run()
    saved = load_file(str(tmp_path / "lora" / "tiny.safetensors"))
    for p, raw in zip(recorded["params"], recorded["after"][-1]):
        assert torch.equal(saved[recorded["names"][id(p)]], raw)
    header, _ = read_log(result.logs[0])
    assert header["ema_decay"] == "0.0"


def test_samples_are_drawn_with_the_ema_weights_and_training_goes_on_raw(tmp_path, logs, recorded, monkeypatch):
    """Samples show what a save at that step would hold: the EMA, not the raw weights."""
    from PIL import Image

    import trainer.training.samples as samples

    seen = {}

    def fake_render(bundle, prompts, **kwargs):
        seen[len(recorded["after"])] = [p.detach().clone().double() for p in recorded["params"]]
        return [Image.new("RGB", (8, 8))]

    monkeypatch.setattr(samples, "render_samples", fake_render)
    data = make_images(tmp_path / "data", n=4)
    cfg = quick_config(data, train_iterations=4, sample_every_n_steps=2, sample_prompts="pattern 0", ema_decay=0.8,
                       train_optimizer="AdamW", train_learning_rate=1e-2)
    result = Trainer(cfg, MemoryHost(tmp_path / "lora"), device="cpu").run()
    assert result.status == "done" and sorted(seen) == [2, 4]
    trajectory = [recorded["before"][0], *recorded["after"]]
    hand = _hand_ema(trajectory, 0.8)
    for step, weights in seen.items():
        assert all(torch.allclose(w, h, atol=1e-6) for w, h in zip(weights, hand[step])), step
        assert any(not torch.allclose(w, r.double()) for w, r in zip(weights, trajectory[step]))
    # step 3 starts from step 2's raw weights, not from the EMA swapped in for the samples
    assert all(torch.equal(a, b) for a, b in zip(recorded["before"][2], recorded["after"][1]))
