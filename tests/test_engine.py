"""The training loop end to end on a tiny model: it learns, saves, logs and stops."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open

from trainer.training.engine import Trainer, TrainingFailed
from trainer.training.events import StopFlag
from trainer.networks.network import Network
from trainer.config.params import ConfigError
from trainer.training.runlog import RAW, read_log
from trainer.families.textenc import encode_prompts

from tests.enginekit import MemoryHost, fixed_eval_loss, make_images, quick_config


def _eval_setup(host, data_cfg):
    """Cached latents of the training images and the caption conditioning."""
    from trainer.data import build_latent_dataset, scan_images

    items = scan_images(data_cfg.lora_data_directory)
    ds = build_latent_dataset(items, data_cfg, host.bundle, device=torch.device("cpu"), multiple=64)
    latents = torch.stack([s.latent for s in ds.samples])
    hidden = encode_prompts(host.bundle, [s.caption for s in ds.samples]).hidden
    return latents, hidden


def test_training_lowers_the_loss_and_the_file_reproduces_it(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    cfg = quick_config(data, train_iterations=30, train_lr_scheduler="constant", train_snr_gamma=0.0,
                       train_learning_rate=1e-2)
    latents, hidden = _eval_setup(host, cfg)
    before = fixed_eval_loss(host.bundle, latents, hidden)
    result = Trainer(cfg, host, device="cpu").run()
    assert result.status == "done" and result.steps == 30
    assert result.output == tmp_path / "lora" / "tiny.safetensors" and result.output.is_file()
    assert fixed_eval_loss(host.bundle, latents, hidden) == pytest.approx(before, abs=1e-6)  # model restored
    net = Network.build(host.bundle, cfg)
    try:
        net.load_weights(result.output)
        after = fixed_eval_loss(host.bundle, latents, hidden)
    finally:
        net.remove()
    assert after < before * 0.9, (before, after)


def test_outputs_metadata_log_and_settings(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    cfg = quick_config(data, train_iterations=6, save_per_steps=2, train_seed=-1, save_as_json=True)
    result = Trainer(cfg, host, device="cpu").run()
    names = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert names == ["tiny.safetensors", "tiny_2steps.safetensors", "tiny_4steps.safetensors"]
    assert host.saved_paths[-1] == result.output and len(result.saved) == 3
    assert 0 <= result.seed < 2**31
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_seed"] == str(result.seed) and meta["ss_max_train_steps"] in ("6",)
    assert meta["ss_output_name"] == "tiny" and meta["ss_num_train_images"] == "4"
    (log_file,) = result.logs
    header, frame = read_log(log_file)
    assert header["train_seed"] == str(result.seed) and header["save_lora_name"] == "tiny"
    assert list(frame["Step"]) == [1, 2, 3, 4, 5, 6]
    assert frame[RAW].iloc[0] == pytest.approx(result.loss_first, rel=1e-6)
    assert frame["Loss"].iloc[1] == pytest.approx(0.9 * frame[RAW].iloc[0] + 0.1 * frame[RAW].iloc[1], rel=1e-5)
    (settings,) = list((tmp_path / "jsons").rglob("*.json"))
    assert json.loads(settings.read_text())["train_seed"] == result.seed
    phases = [e.phase for e in host.events]
    assert phases[0] == "loading" and "caching" in phases and "training" in phases and phases[-1] == "done"


def test_same_seed_same_result(tmp_path, logs):
    data = make_images(tmp_path / "data")
    losses = []
    for run in ("a", "b"):
        host = MemoryHost(tmp_path / run)
        losses.append(Trainer(quick_config(data, train_iterations=3), host, device="cpu").run().loss_last)
    assert losses[0] == losses[1]


def test_existing_output_is_refused_before_any_work(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "tiny.safetensors").write_bytes(b"precious")
    with pytest.raises(ConfigError) as err:
        Trainer(quick_config(data), host, device="cpu").run()
    assert err.value.key == "save_lora_name"
    assert (tmp_path / "lora" / "tiny.safetensors").read_bytes() == b"precious"
    assert host.sessions == 0 and not logs.exists()
    result = Trainer(quick_config(data, save_overwrite=True), host, device="cpu").run()
    assert result.output.read_bytes()[:8] != b"precious"


def test_stop_and_save_keeps_partial_work(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    stop = StopFlag()

    def listener(p):
        if p.phase == "training" and p.step == 3:
            stop.request(save=True)

    result = Trainer(quick_config(data, train_iterations=50), host, device="cpu", stop=stop,
                     listeners=[listener]).run()
    assert result.status == "stopped" and result.steps == 3
    assert result.output is not None and result.output.is_file()
    with safe_open(str(result.output), "pt") as f:
        assert f.metadata()["ss_steps"] == "3" and f.metadata()["ss_max_train_steps"] == "50"


def test_stop_without_save_writes_nothing(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    stop = StopFlag()
    stop.request(save=False)  # already set: stops during caching
    result = Trainer(quick_config(data), host, device="cpu", stop=stop).run()
    assert result.status == "stopped" and result.steps == 0 and result.output is None
    assert not (tmp_path / "lora").exists() or list((tmp_path / "lora").iterdir()) == []


def test_nan_loss_stops_the_job_and_keeps_earlier_saves(tmp_path, logs, monkeypatch):
    from trainer.modes import lora

    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    real = lora.LoraMode.loss

    def poisoned(self, ctx, step):
        loss = real(self, ctx, step)
        return loss * float("nan") if step == 5 else loss

    monkeypatch.setattr(lora.LoraMode, "loss", poisoned)
    with pytest.raises(TrainingFailed, match="nan at step 5") as err:
        Trainer(quick_config(data, train_iterations=8, save_per_steps=2), host, device="cpu").run()
    kept = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert kept == ["tiny_2steps.safetensors", "tiny_4steps.safetensors"]
    assert "tiny_4steps" in str(err.value)
    before = [p.detach().clone() for p in host.bundle.unet.parameters()][:3]
    assert all(torch.equal(a, b) for a, b in zip(before, list(host.bundle.unet.parameters())[:3]))


def test_network_is_removed_even_when_the_job_fails(tmp_path, logs, monkeypatch):
    from trainer.modes import lora

    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    names_before = [n for n, _ in host.bundle.unet.named_modules()]

    def boom(self, ctx, step):
        raise torch.OutOfMemoryError("fake OOM")

    monkeypatch.setattr(lora.LoraMode, "loss", boom)
    with pytest.raises(TrainingFailed, match="out of memory"):
        Trainer(quick_config(data), host, device="cpu").run()
    assert [n for n, _ in host.bundle.unet.named_modules()] == names_before
    assert not host.in_session


def test_text_encoder_training_changes_te_keys(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    cfg = quick_config(data, network_blocks=["BASE", "IN01", "OUT11"], train_textencoder_learning_rate=1e-3)
    result = Trainer(cfg, host, device="cpu").run()
    with safe_open(str(result.output), "pt") as f:
        keys = list(f.keys())
        te_up = [f.get_tensor(k) for k in keys if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up and any(t.abs().sum() > 0 for t in te_up)  # up starts at zero: non-zero means it trained


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_train(tmp_path, logs, family):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora", family=family)
    result = Trainer(quick_config(data, train_iterations=2), host, device="cpu").run()
    assert result.status == "done" and result.output.is_file()
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == host.bundle.family.model_version


def test_stop_flag_from_another_thread(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    stop = StopFlag()
    started = threading.Event()
    host.progress = lambda p: started.set() if p.phase == "training" and p.step >= 1 else None
    timer = threading.Thread(target=lambda: (started.wait(60), stop.request(save=False)))
    timer.start()
    result = Trainer(quick_config(data, train_iterations=10_000), host, device="cpu", stop=stop).run()
    timer.join()
    assert result.status == "stopped" and 1 <= result.steps < 10_000 and result.output is None


def test_precisions_reach_model_network_and_file(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    seen = {}

    def look(p):
        if p.phase == "training" and p.step == 1 and not seen:
            seen["unet"] = next(host.bundle.unet.parameters()).dtype
            seen["gc"] = host.bundle.unet.is_gradient_checkpointing

    cfg = quick_config(data, train_iterations=2, train_model_precision="bf16", train_lora_precision="bf16",
                       save_precision="fp16", use_gradient_checkpointing=True)
    result = Trainer(cfg, host, device="cpu", listeners=[look]).run()
    assert seen == {"unet": torch.bfloat16, "gc": True}
    assert not host.bundle.unet.is_gradient_checkpointing  # switched off again afterwards
    with safe_open(str(result.output), "pt") as f:
        dtypes = {k.rsplit(".", 1)[-1] if k.endswith("alpha") else "weight": f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {"alpha": torch.float32, "weight": torch.float16}


def test_fp16_model_precision_falls_back_to_fp32_on_cpu(tmp_path, logs):
    data = make_images(tmp_path / "data")
    host = MemoryHost(tmp_path / "lora")
    seen = []
    cfg = quick_config(data, train_iterations=1, train_model_precision="fp16")
    Trainer(cfg, host, device="cpu",
            listeners=[lambda p: seen.append(next(host.bundle.unet.parameters()).dtype)]).run()
    assert set(seen) == {torch.float32}


def test_gradient_checkpointing_gives_the_same_result(tmp_path, logs):
    data = make_images(tmp_path / "data")
    results = []
    for gc in (False, True):
        host = MemoryHost(tmp_path / f"lora{gc}")
        cfg = quick_config(data, train_iterations=3, use_gradient_checkpointing=gc)
        results.append(Trainer(cfg, host, device="cpu").run().loss_last)
    assert results[0] == pytest.approx(results[1], rel=1e-5)
