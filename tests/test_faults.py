"""Faults during a job: NaN/inf losses, out-of-memory inside a step, and Stop / Stop-and-Save at
any moment; the last good save stays, the host's model is restored, the queue goes on."""
from __future__ import annotations

import pytest
import torch

import trainer.training.devices as devices
from trainer.training.engine import Trainer
from trainer.training.events import StopFlag
from trainer.hosts.weights import weights_digest
from trainer.jobs.queue import JobQueue
from trainer.modes.difference import DifferenceMode
from trainer.modes.lora import LoraMode

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.modekit import write_pair
from tests.tiny import tiny_bundle
from tests.webuikit import a1111_model, fake_webui, host_tensors


def break_step(monkeypatch, cls, at: int, make) -> None:
    """The mode's loss at step `at` of the first job becomes make(loss) (a NaN, or an exception)."""
    real, fired = cls.loss, []

    def loss(self, ctx, step):
        out = real(self, ctx, step)
        if step == at and not fired:
            fired.append(step)
            return make(out)
        return out

    monkeypatch.setattr(cls, "loss", loss)


def queue_of(tmp_path, host) -> JobQueue:
    return JobQueue(tmp_path / "queue.json", lambda cfg, stop, listener: Trainer(
        cfg, host, device="cpu", stop=stop, listeners=[listener]).run())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_loss_fails_the_job_keeps_its_last_save_and_the_queue_goes_on(tmp_path, logs, monkeypatch, bad):
    data = make_images(tmp_path / "data")
    break_step(monkeypatch, LoraMode, 3, lambda loss: loss * bad)
    queue = queue_of(tmp_path, MemoryHost(tmp_path / "out"))
    queue.add(quick_config(data, save_lora_name="first", train_iterations=5, save_per_steps=2))
    queue.add(quick_config(data, save_lora_name="second", train_iterations=2))
    assert queue.start() and queue.wait(120)
    first, second = queue.snapshot()
    assert first["state"] == "failed" and f"loss became {bad} at step 3" in first["message"]
    assert "first_2steps.safetensors" in first["message"]  # the message lists what was kept
    assert (tmp_path / "out" / "first_2steps.safetensors").is_file()
    assert not (tmp_path / "out" / "first.safetensors").exists()
    assert second["state"] == "done" and (tmp_path / "out" / "second.safetensors").is_file()
    queue.close()


def test_out_of_memory_in_a_step_frees_memory_restores_the_host_and_the_queue_goes_on(tmp_path, logs, monkeypatch):
    from trainer.hosts.webui import WebUIHost

    freed = []
    monkeypatch.setattr(devices, "empty_cache", lambda device: freed.append(device))

    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    break_step(monkeypatch, LoraMode, 2, oom)
    data = make_images(tmp_path / "data")
    with fake_webui("a1111") as w:
        w.shared.sd_model = model = a1111_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        w.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        before = weights_digest(host_tensors(model))
        queue = queue_of(tmp_path, WebUIHost())
        queue.add(quick_config(data, model="", save_lora_name="big", train_iterations=4))
        queue.add(quick_config(data, model="", save_lora_name="small", train_iterations=2))
        assert queue.start() and queue.wait(120)
        big, small = queue.snapshot()
        assert big["state"] == "failed" and "out of memory at step 2" in big["message"]
        assert "smaller batch" in big["message"]  # it says what to try
        assert small["state"] == "done" and (tmp_path / "Lora" / "small.safetensors").is_file()
        assert len(freed) >= 2  # after the OOM itself and at the end of the job
        assert weights_digest(host_tensors(model)) == before
        assert not w.call_queue.queue_lock.locked() and w.shared.state.ended == 2
        queue.close()


def stop_when(stop: StopFlag, save: bool, condition):
    def listener(p):
        if condition(p) and not stop.requested:
            stop.request(save)
    return listener


@pytest.mark.parametrize("save", [False, True])
def test_stop_while_caching_writes_nothing(tmp_path, logs, save):
    stop = StopFlag()
    cfg = quick_config(make_images(tmp_path / "data"), train_iterations=50)
    result = Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu", stop=stop,
                     listeners=[stop_when(stop, save, lambda p: p.phase == "caching")]).run()
    assert result.status == "stopped" and result.steps == 0 and result.output is None
    assert "nothing saved" in result.message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("save", [False, True])
def test_stop_during_a_step_ends_after_it(tmp_path, logs, monkeypatch, save):
    stop = StopFlag()
    real = LoraMode.loss

    def loss(self, ctx, step):
        if step == 2:
            stop.request(save)  # pressed while step 2 computes
        return real(self, ctx, step)

    monkeypatch.setattr(LoraMode, "loss", loss)
    cfg = quick_config(make_images(tmp_path / "data"), train_iterations=50)
    result = Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu", stop=stop).run()
    assert result.status == "stopped" and result.steps == 2
    assert (tmp_path / "out" / "tiny.safetensors").is_file() == save
    assert result.output == (tmp_path / "out" / "tiny.safetensors" if save else None)


@pytest.mark.parametrize("save", [False, True])
def test_stop_between_difference_passes(tmp_path, logs, monkeypatch, save):
    prepared = []
    real = DifferenceMode.prepare
    monkeypatch.setattr(DifferenceMode, "prepare", lambda self, ctx: prepared.append(ctx.spec.role) or real(self, ctx))
    orig, targ = write_pair(tmp_path / "pair")
    cfg = quick_config(tmp_path, mode="Difference", diff_original_image=str(orig), diff_target_image=str(targ),
                       train_iterations=3, diff_save_1st_pass=True, save_lora_name="d")
    stop = StopFlag()
    last_of_pass1 = stop_when(stop, save, lambda p: p.pass_index == 1 and p.phase == "training" and p.step == 3)
    result = Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu", stop=stop, listeners=[last_of_pass1]).run()
    assert result.status == "stopped" and prepared == ["copier"]  # pass 2 never started
    assert (tmp_path / "out" / "d_copy.safetensors").is_file()   # pass 1's own save stays
    assert not (tmp_path / "out" / "d.safetensors").exists()
