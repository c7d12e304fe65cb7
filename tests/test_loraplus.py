"""LoRA+: lora_up matrices train at ratio x lr, per part, with every group-taking optimizer."""
from __future__ import annotations

import pytest
import torch

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.tiny import tiny_bundle
from trainer.config.schema import TrainConfig
from trainer.training.engine import Trainer
from trainer.networks.network import Network
from trainer.training.optim import build_optimizer, build_scheduler, is_schedule_free
from trainer.config.params import ConfigError
from trainer.training.runlog import read_log

LR, TE_LR = 1e-3, 5e-4


def cfg_of(**kw) -> TrainConfig:
    base = dict(network_rank=4, network_alpha=2.0, save_lora_name="t", train_learning_rate=LR,
                train_textencoder_learning_rate=TE_LR, loraplus_lr_ratio=16.0)
    base.update(kw)
    return TrainConfig(**base)


def ups_of(modules) -> set[int]:
    """ids of the lora_up weights, read from the modules themselves."""
    return {id(m.lora_up.weight) for m in modules}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("ntype", ["lierla", "c3lier"])
def test_groups_carry_ratio_rates_and_exactly_the_up_weights(family: str, ntype: str) -> None:
    net = Network.build(tiny_bundle(family), cfg_of(network_type=ntype, loraplus_text_encoder_lr_ratio=4.0).validate())
    groups = {g["name"]: g for g in net.param_groups(LR, TE_LR)}
    assert list(groups) == ["unet", "unet_up", "text_encoder", "text_encoder_up"]
    assert [groups[n]["lr"] for n in groups] == pytest.approx([LR, 16 * LR, TE_LR, 4 * TE_LR])
    assert {id(p) for p in groups["unet_up"]["params"]} == ups_of(net.unet_modules)
    assert {id(p) for p in groups["text_encoder_up"]["params"]} == ups_of(net.text_encoder_modules)
    downs = {id(p) for n in ("unet", "text_encoder") for p in groups[n]["params"]}
    assert not downs & (ups_of(net.unet_modules) | ups_of(net.text_encoder_modules))
    every = {id(p) for p in net.parameters()}
    assert {id(p) for g in groups.values() for p in g["params"]} == every
    frozen = net.param_groups(0.0, 0.0)
    assert {id(p) for g in frozen for p in g["params"]} == every and all(g["lr"] == 0 for g in frozen)


def test_unet_ratio_overrides_and_zero_turns_a_part_off() -> None:
    net = Network.build(tiny_bundle("sd1"), cfg_of(loraplus_unet_lr_ratio=0.0).validate())
    groups = {g["name"]: g["lr"] for g in net.param_groups(LR, TE_LR)}
    assert groups == pytest.approx({"unet": LR, "text_encoder": TE_LR, "text_encoder_up": 16 * TE_LR})
    net.remove()
    net = Network.build(tiny_bundle("sd1"), cfg_of(loraplus_lr_ratio=0.0, loraplus_unet_lr_ratio=8.0).validate())
    groups = {g["name"]: g["lr"] for g in net.param_groups(LR, TE_LR)}
    assert groups == pytest.approx({"unet": LR, "unet_up": 8 * LR, "text_encoder": TE_LR})


def test_dora_keeps_magnitude_with_the_down_matrices() -> None:
    net = Network.build(tiny_bundle("sd1"), cfg_of(network_dora=True).validate())
    groups = {g["name"]: g for g in net.param_groups(LR, TE_LR)}
    scales = {id(m.dora_scale) for m in net.unet_modules}
    assert scales <= {id(p) for p in groups["unet"]["params"]}
    assert {id(p) for p in groups["unet_up"]["params"]} == ups_of(net.unet_modules)


@pytest.mark.parametrize("ntype", ["loha", "lokr"])
@pytest.mark.parametrize("field", ["loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"])
def test_loha_and_lokr_are_refused(ntype: str, field: str) -> None:
    cfg = cfg_of(network_type=ntype, **{"loraplus_lr_ratio": 0.0, field: 4.0})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.key == field and err.value.value == 4.0 and ntype in err.value.problem


def _step_with_fake_grads(net: Network, opt, sched, steps: int) -> list[list[float]]:
    lrs = []
    for step in range(steps):
        torch.manual_seed(step)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lrs.append([float(x) for x in sched.get_last_lr()])
    return lrs


@pytest.mark.parametrize("optimizer", ["AdamW", "Lion", "AdamWScheduleFree", "DAdaptAdaGrad", "CAME"])
def test_optimizers_and_scheduler_keep_the_ratio(optimizer: str) -> None:
    net = Network.build(tiny_bundle("sd1"), cfg_of().validate())
    groups = net.param_groups(LR, TE_LR)
    opt = build_optimizer(optimizer, groups, LR, "")
    sched = build_scheduler("cosine", opt, total_steps=10, warmup_steps=2, num_cycles=1, power=1.0,
                            step_rules="", settings_text="")
    ups_before = [m.lora_up.weight.detach().clone() for m in net.unet_modules]
    lrs = _step_with_fake_grads(net, opt, sched, 4)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["unet", "unet_up", "text_encoder", "text_encoder_up"]
    for row in lrs:  # warmup then cosine: every group follows the same curve
        assert row[1] == pytest.approx(16 * row[0]) and row[3] == pytest.approx(16 * row[2])
        assert row[2] == pytest.approx(row[0] * TE_LR / LR)
    # warmup and cosine moved the rates; schedule-free optimizers keep theirs constant
    assert (lrs[0][0] != lrs[-1][0]) == (not is_schedule_free(opt))
    assert any(not torch.equal(a, m.lora_up.weight) for a, m in zip(ups_before, net.unet_modules))


@pytest.mark.parametrize("optimizer", ["Prodigy", "DAdaptAdam"])
def test_one_rate_optimizers_name_loraplus(optimizer: str) -> None:
    net = Network.build(tiny_bundle("sd1"), cfg_of(train_learning_rate=1.0, train_textencoder_learning_rate=1.0))
    with pytest.raises(ConfigError) as err:
        build_optimizer(optimizer, net.param_groups(1.0, 1.0), 1.0, "")
    assert err.value.key == "loraplus_lr_ratio" and err.value.value == [1.0, 16.0]


def test_job_trains_the_up_matrices_faster_and_logs_one_rate_per_group(tmp_path, logs) -> None:
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    cfg = quick_config(data, network_blocks=["BASE", "IN01", "OUT11"], train_textencoder_learning_rate=5e-4,
                       loraplus_lr_ratio=16.0, train_iterations=3, train_lr_scheduler="constant")
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done"
    (log_file,) = result.logs
    header, frame = read_log(log_file)
    rates = [frame[f"Learning Rate {i}"].iloc[-1] for i in range(1, 5)]
    assert rates == pytest.approx([1e-3, 16e-3, 5e-4, 8e-3])
    # the header says which group each column is: U-Net, its up matrices, text encoder, its up matrices
    assert header["lr_groups"].split(";") == ["unet", "unet_up", "text_encoder", "text_encoder_up"]
