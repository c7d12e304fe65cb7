"""The WebUI host adapter against a stand-in for A1111's and Forge's `modules`: the loaded model
reused from memory, its weights untouched, the host's lock and progress, LoRA unmerging."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import trainer.families.loading as models
from trainer.training.engine import Trainer
from trainer.hosts.weights import weights_digest
from trainer.config.params import ConfigError
from trainer.families.textenc import encode_prompts

from tests.enginekit import make_images, quick_config
from tests.ldm_export import assert_same_model
from tests.tiny import tiny_bundle
from tests.webuikit import a1111_model, fake_webui, forge_model, fp16_exact, host_tensors

CPU = torch.device("cpu")


@pytest.fixture(params=["a1111", "forge"])
def kind(request):
    return request.param


def no_file_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a checkpoint file was read")
    monkeypatch.setattr(models, "read_state_dict", refuse)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_loaded_model_is_reused_from_memory(kind, family, tmp_path, monkeypatch):
    from trainer.hosts.webui import WebUIHost

    src = fp16_exact(tiny_bundle(family))  # Forge holds fp16 copies: the same values
    with fake_webui(kind) as w:
        make = forge_model if kind == "forge" else a1111_model
        w.shared.sd_model = model = make(src, tmp_path / f"{family}.safetensors")
        host = WebUIHost()
        assert host.kind == kind and host.is_loaded("") and host.is_loaded(model.sd_checkpoint_info.title)
        no_file_reads(monkeypatch)
        bundle = host.load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        assert bundle.family.name == family and bundle.v_pred == src.v_pred and bundle.extra["reused_from_host"]
        assert_same_model(src, bundle)
        host_ptrs = {t.data_ptr() for t in host_tensors(model)}
        unet_ptrs = [p.data_ptr() for p in bundle.unet.parameters()]
        shared = sum(p in host_ptrs for p in unet_ptrs) / len(unet_ptrs)
        if kind == "a1111":
            assert shared > 0.9  # renamed, not copied (only reshaped tensors are new)
        else:  # owned copies, all in the dtype asked for (Forge mixes fp16 and fp32), no alias left
            tensors = [t for m in bundle.modules() for t in m.parameters()]
            assert shared == 0 and not any(t.is_inference() or t.dtype != torch.float32 for t in tensors)
        assert "reused from memory, no file read" in bundle.extra["trains_on"]


def test_forge_leaves_out_the_lora_its_last_generation_merged(tmp_path, logs):
    """Forge's LoraLoader replaces merged Parameters and keeps the originals in `lora_loader.backup`
    until a generation without LoRAs: the job reads the originals and changes nothing in the host."""
    from trainer.hosts.webui import WebUIHost

    src = fp16_exact(tiny_bundle("sd1"))
    with fake_webui("forge") as w:
        w.shared.sd_model = model = forge_model(src, tmp_path / "m.safetensors")
        kmodel, clip = model.forge_objects.unet.model, model.forge_objects.clip.cond_stage_model
        merged = ((kmodel, "diffusion_model.input_blocks.1.1.proj_in.weight"),
                  (clip, "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"))
        for holder, key in merged:
            path, leaf = key.rsplit(".", 1)
            owner = holder.get_submodule(path)
            holder.lora_loader = SimpleNamespace(backup={key: getattr(owner, leaf)}, loaded_hash="[('x',)]")
            with torch.inference_mode():
                setattr(owner, leaf, torch.nn.Parameter(getattr(owner, leaf) + 0.5, requires_grad=False))
        before = weights_digest(host_tensors(model))
        bundle = WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        assert_same_model(src, bundle)
        assert bundle.extra["loras_taken_out"] == 2 and "2 weights of a merged LoRA left out" in bundle.extra["trains_on"]
        assert weights_digest(host_tensors(model)) == before  # the host keeps its merge and its backups


def run_job(host, tmp_path, **over):
    data = make_images(tmp_path / "data")
    seen, messages = [], []

    def look(p):
        from modules import call_queue, shared

        messages.append(p.message)
        if p.phase == "training":
            seen.append((call_queue.queue_lock.locked(), shared.state.job, shared.state.sampling_step))

    result = Trainer(quick_config(data, model="", **over), host, device="cpu", listeners=[look]).run()
    return result, seen, messages


def test_a_job_holds_the_lock_shows_progress_and_leaves_the_weights_alone(kind, tmp_path, monkeypatch):
    from trainer.hosts.webui import WebUIHost

    with fake_webui(kind) as w:
        make = forge_model if kind == "forge" else a1111_model
        w.shared.sd_model = model = make(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        w.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        before = weights_digest(host_tensors(model))
        no_file_reads(monkeypatch)
        result, seen, messages = run_job(WebUIHost(), tmp_path, train_iterations=3)
        assert result.status == "done" and result.output == tmp_path / "Lora" / "tiny.safetensors"
        assert seen and all(locked and job == "traindeck" for locked, job, _ in seen)
        assert list(dict.fromkeys(s for *_, s in seen if s)) == [1, 2, 3]  # the host sees each step
        assert not w.call_queue.queue_lock.locked() and w.shared.state.ended == 1 and w.devices.gc_calls
        assert w.networks.refreshed  # the host's Lora list was refreshed after the save
        assert weights_digest(host_tensors(model)) == before
        # the tab's status line while loading, and the job's final message, say which model and from where
        said = "training on the WebUI's loaded model m.safetensors [0123456789] (reused from memory, no file read)"
        assert said in messages and result.message.endswith(said)


def test_a_failing_job_releases_everything(tmp_path, logs):
    from trainer.hosts.webui import WebUIHost

    with fake_webui("a1111") as w:
        w.shared.sd_model = model = a1111_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        before = weights_digest(host_tensors(model))
        with pytest.raises(ConfigError, match="lora_data_directory"):
            Trainer(quick_config(tmp_path / "missing", model=""), WebUIHost(), device="cpu").run()
        assert not w.call_queue.queue_lock.locked() and w.shared.state.ended == 1
        assert weights_digest(host_tensors(model)) == before


def test_a_merged_lora_is_taken_out_first(tmp_path, logs):
    from trainer.hosts.webui import WebUIHost

    src = tiny_bundle("sd1")
    with fake_webui("a1111") as w:
        w.shared.sd_model = model = a1111_model(src, tmp_path / "m.safetensors")
        target = model.model.diffusion_model.input_blocks.get_submodule("1.1.proj_in")
        pristine = target.weight.detach().clone()
        target.network_weights_backup = pristine.clone()
        target.network_bias_backup = target.bias.detach().clone()  # A1111 backs up both
        target.network_current_names = ("somelora",)
        assert target.weight.requires_grad  # A1111 leaves it on, and its restore is a plain copy_
        with torch.no_grad():
            target.weight.add_(0.5)  # merged in place, as the built-in Lora extension leaves it
        w.networks.loaded_networks.append("somelora")
        bundle = WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        assert torch.equal(target.weight, pristine) and target.network_current_names == ()
        assert w.networks.loaded_networks == []
        assert_same_model(src, bundle)
        target.network_current_names = ("again",)
        del w.networks.network_restore_weights_from_backup
        with pytest.raises(ConfigError, match="a LoRA is merged"):
            WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)


def test_another_checkpoint_comes_from_its_file(kind, tmp_path):
    from trainer.hosts.webui import WebUIHost

    with fake_webui(kind) as w:
        make = forge_model if kind == "forge" else a1111_model
        w.shared.sd_model = make(tiny_bundle("sd1", seed=1), tmp_path / "loaded.safetensors")
        other = tiny_bundle("sd1", seed=2)
        title = a1111_model(other, tmp_path / "other.safetensors").sd_checkpoint_info.title
        host = WebUIHost()
        assert not host.is_loaded(title)
        bundle = host.load_bundle(quick_config(tmp_path, model=title), dtype=torch.float32, device=CPU)
        assert "reused_from_host" not in bundle.extra
        assert_same_model(other, bundle)
        with pytest.raises(ConfigError, match="not a checkpoint the WebUI knows"):
            host.load_bundle(quick_config(tmp_path, model="nope"), dtype=torch.float32, device=CPU)


def test_forge_before_its_first_generation_loads_the_selected_file(tmp_path):
    from types import SimpleNamespace

    from trainer.hosts.webui import WebUIHost

    with fake_webui("forge") as w:
        src = tiny_bundle("sd1")
        info = forge_model(src, tmp_path / "m.safetensors").sd_checkpoint_info
        w.shared.sd_model = SimpleNamespace()  # FakeInitialModel: no forge_objects, no weights
        w.shared.opts.sd_model_checkpoint = info.title
        host = WebUIHost()
        assert not host.is_loaded("")
        bundle = host.load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        assert "reused_from_host" not in bundle.extra
        assert_same_model(src, bundle)


@pytest.mark.parametrize("skip", [1, 2])
def test_prompts_use_the_hosts_clip_skip(kind, skip, tmp_path):
    from trainer.hosts.webui import WebUIHost

    with fake_webui(kind) as w:
        make = forge_model if kind == "forge" else a1111_model
        w.shared.sd_model = make(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        w.shared.opts.CLIP_stop_at_last_layers = skip
        host = WebUIHost()
        bundle = host.load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        got = host.encode_fn(bundle)(["a photo of a cat"]).hidden
        want = encode_prompts(bundle, ["a photo of a cat"], clip_skip=skip).hidden
        other = encode_prompts(bundle, ["a photo of a cat"], clip_skip=3 - skip).hidden
        assert torch.equal(got, want) and not torch.equal(got, other)


def test_the_hosts_interrupt_stops_and_saves(tmp_path, logs):
    from trainer.hosts.webui import WebUIHost
    from trainer.training.events import StopFlag

    with fake_webui("a1111") as w:
        w.shared.sd_model = a1111_model(tiny_bundle("sd1"), tmp_path / "m.safetensors")
        w.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
        host, stop = WebUIHost(), StopFlag()
        host.on_interrupt = lambda: stop.request(save=True)

        def press(p):
            if p.phase == "training" and p.step == 2:
                w.shared.state.interrupted = True

        data = make_images(tmp_path / "data")
        result = Trainer(quick_config(data, model="", train_iterations=50), host, device="cpu", stop=stop,
                         listeners=[press]).run()
        assert result.status == "stopped" and result.output == tmp_path / "Lora" / "tiny.safetensors"
        assert result.steps < 50


def test_versions_outside_the_tested_ones_are_reported(tmp_path):
    from trainer.hosts.webui import host_kind

    with fake_webui("a1111"):
        import modules.launch_utils as launch

        assert host_kind() == ("a1111", "AUTOMATIC1111 v1.10.1")
        launch.tag = "v1.7.0"
        kind, text = host_kind()
        assert kind == "unsupported" and "v1.7.0" in text and "not one Traindeck was tested on" in text
    with fake_webui("forge"):
        assert host_kind()[0] == "forge"



def test_forge_says_when_its_clip_skip_is_not_applied(tmp_path, capsys):
    """Forge applies clip skip to SD2 (past 1) and SDXL (past 2); training keeps A1111's layers there."""
    from trainer.hosts.webui import WebUIHost

    with fake_webui("forge") as w:
        w.shared.sd_model = forge_model(tiny_bundle("sdxl"), tmp_path / "m.safetensors")
        host = WebUIHost()
        bundle = host.load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        for skip, said in ((2, False), (3, True)):
            w.shared.opts.CLIP_stop_at_last_layers = skip
            capsys.readouterr()
            host.encode_fn(bundle)
            assert ("clip skip 3 is not applied to SDXL" in capsys.readouterr().out) is said


def test_forge_with_a_lossy_unet_storage_reads_the_checkpoint(tmp_path, monkeypatch):
    """fp8/nf4/gguf storage (Forge's `--unet-in-fp8-*` or its UI setting) holds rounded weights:
    the job reads the checkpoint instead, and says why."""
    from trainer.hosts.webui import WebUIHost

    src = tiny_bundle("sd1")
    with fake_webui("forge") as w:
        w.shared.sd_model = model = forge_model(src, tmp_path / "m.safetensors")
        w.shared.opts.sd_model_checkpoint = model.sd_checkpoint_info.title
        unet = model.forge_objects.unet.model.diffusion_model
        unet.storage_dtype = torch.float32  # what Forge sets on its U-Net; exact: reused
        assert WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU).extra[
            "reused_from_host"]
        unet.storage_dtype = torch.float8_e4m3fn
        bundle = WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
        assert "reused_from_host" not in bundle.extra and "float8_e4m3fn" in bundle.extra["trains_on"]
        assert_same_model(src, bundle)


def test_forge_holding_an_sdxl_refiner_is_refused_with_a_message(tmp_path):
    """Forge's SDXL refiner has only clip_g; the trainer's SDXL needs both text encoders."""
    from trainer.hosts.webui import WebUIHost

    with fake_webui("forge") as w:
        w.shared.sd_model = model = forge_model(tiny_bundle("sdxl"), tmp_path / "m.safetensors")
        del model.forge_objects.clip.cond_stage_model.clip_l
        with pytest.raises(ConfigError, match="SDXL refiner"):
            WebUIHost().load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_flux_checkpoint_is_read_from_its_files_with_a_message(kind, tmp_path, monkeypatch):
    """Neither WebUI can lend FLUX weights to train: the job reads the checkpoint and the parts the
    user picked from the WebUI's model folders, and says why."""
    from tests.flux_tiny import save_flux_files, t5_tokenizer_object, tiny_flux

    models = tmp_path / "models"
    files = save_flux_files(tiny_flux("dev"), models / "Stable-diffusion")
    (models / "text_encoder").mkdir()
    for role in ("clip_l", "t5xxl"):
        files[role].rename(models / "text_encoder" / files[role].name)
    t5_tokenizer_object().save(str(models / "text_encoder" / "tokenizer.json"))
    with fake_webui(kind) as w:
        import modules.paths

        from trainer.hosts.webui import WebUIHost

        monkeypatch.setattr(modules.paths, "models_path", str(models))
        info = w.sd_models.checkpoint_info(files["transformer"], "flux1-dev")
        w.sd_models.checkpoints_list[info.title] = info
        cfg = quick_config(tmp_path, model=info.title, clip_l="clip_l", t5xxl="t5xxl_fp16.safetensors", ae="ae")
        bundle = WebUIHost().load_bundle(cfg, dtype=torch.float32, device=CPU)
        assert bundle.family.name == "flux" and not bundle.extra.get("reused_from_host")
        assert "flux1-dev.safetensors" in bundle.extra["trains_on"]
        assert ("cannot hand FLUX.1 weights" if kind == "a1111" else "holds FLUX.1 for inference only") in bundle.extra["trains_on"]
        with pytest.raises(ConfigError) as err:
            WebUIHost().load_bundle(quick_config(tmp_path, model=info.title, clip_l="/etc/passwd"),
                                    dtype=torch.float32, device=CPU)
        assert err.value.key == "clip_l" and "model folders" in str(err.value)


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_loaded_zimage_checkpoint_is_refused_with_the_versions(kind, tmp_path, monkeypatch):
    """Even while the WebUI holds it (as a host with its own Z-Image support would), a Z-Image
    checkpoint in an environment whose diffusers cannot build one is refused, naming the versions,
    before any of the host's weights are touched."""
    from trainer.families import zimage_load

    from tests.test_zimage_refusal import zimage_header

    path = zimage_header(tmp_path / "models" / "Stable-diffusion" / "z_image_turbo.safetensors")
    monkeypatch.setattr(zimage_load, "has_zimage", lambda: False)
    with fake_webui(kind) as w:
        from trainer.hosts.webui import WebUIHost

        info = w.sd_models.checkpoint_info(path, "z_image_turbo")
        w.sd_models.checkpoints_list[info.title] = info
        # a held model: the host would hand over its weights (forge_objects marks a loaded Forge model)
        w.shared.sd_model = SimpleNamespace(sd_checkpoint_info=info, forge_objects=None)
        host = WebUIHost()
        assert host.is_loaded("")
        monkeypatch.setattr(host, "_from_memory", lambda *a, **k: pytest.fail("the host's weights were used"))
        with pytest.raises(ConfigError) as err:
            host.load_bundle(quick_config(tmp_path, model=""), dtype=torch.float32, device=CPU)
    assert err.value.key == "model" and "diffusers >= 0.36" in str(err.value)
