"""The UI's logic without gradio (every profile): form <-> config, uploads, model lists, the demo,
and samples rendered by the engine."""
from __future__ import annotations

import pytest
from PIL import Image

from trainer.config.schema import SECOND_PASS_FIELDS, TrainConfig
from trainer.demo import DEMO_MODEL, ensure_demo
from trainer.training.engine import Trainer
from trainer.hosts.base import StandaloneHost, model_names
from trainer.families.loading import load_model
from trainer.config.params import ConfigError
from trainer.config.presets import load_preset
from trainer.ui import form

from tests.enginekit import MemoryHost, make_images, quick_config
from tests.modekit import write_pair


def test_form_round_trips_every_shipped_preset():
    for name in ("LoRA", "iLECO", "Difference", "Difference_Use2ndPass", "ADDifT", "Multi-ADDifT", "LoRA_Demo"):
        cfg = load_preset(name)
        again = form.config_from(form.form_values(cfg), form.second_values(cfg))
        assert again.to_dict() == {**cfg.to_dict(), **({"2nd pass": again.second_pass} if again.second_pass else {})}
        if name == "Difference_Use2ndPass":
            assert again.for_pass(2).network_rank == cfg.for_pass(2).network_rank == 4


def test_widgets_hold_text_like_a_preset():
    values = form.form_values(TrainConfig(image_size=[512, 768], train_textencoder_learning_rate=None))
    assert values["image_size"] == "512,768" and values["train_textencoder_learning_rate"] == ""
    assert values["train_learning_rate"] == "0.0001" and values["train_iterations"] == "1000"
    with pytest.raises(ConfigError, match="network_rank: expected a whole number"):
        form.config_from({**values, "network_rank": "4.5"})


def test_empty_fields_take_the_fallbacks():
    values = form.form_values(TrainConfig())
    cfg = form.config_from(values, fallbacks={"model": "demo", "lora_data_directory": "/data"})
    assert (cfg.model, cfg.lora_data_directory) == ("demo", "/data")
    cfg = form.config_from({**values, "model": "mine"}, fallbacks={"model": "demo"})
    assert cfg.model == "mine"


def test_second_pass_values_are_kept_only_for_difference():
    values = form.form_values(TrainConfig(mode="Difference"))
    second = {n: v for n, v in form.second_values(TrainConfig()).items()}
    second["network_rank"] = "2"
    assert form.config_from(values, second).second_pass["network_rank"] == "2"
    assert form.config_from({**values, "mode": "LoRA"}, second).second_pass == {}
    assert set(form.second_values(TrainConfig())) == set(SECOND_PASS_FIELDS)


def test_uploads_are_copied_once_by_content(tmp_path):
    orig, targ = write_pair(tmp_path / "tmp")
    kept = form.persist_upload(str(orig), tmp_path / "uploads", "diff_original_image")
    again = form.persist_upload(str(orig), tmp_path / "uploads", "diff_original_image")
    assert kept == again and len(list((tmp_path / "uploads").iterdir())) == 1
    assert form.persist_upload(kept, tmp_path / "uploads", "x") == kept
    assert form.persist_upload(None, tmp_path / "uploads", "x") == ""
    with pytest.raises(ConfigError, match="diff_target_image: the uploaded image is gone"):
        form.persist_upload(str(tmp_path / "gone.png"), tmp_path / "uploads", "diff_target_image")


def test_visible_fields_follow_the_schema():
    assert "original_prompt" in form.visible_fields("iLECO") and "lora_data_directory" not in form.visible_fields("iLECO")
    assert "diff_target_name" in form.visible_fields("Multi-ADDifT") and "diff_target_name" not in form.visible_fields("LoRA")


def test_model_names_lists_files_and_diffusers_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.safetensors", "sub/b.ckpt", "notes.txt", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert model_names([tmp_path]) == ["a.safetensors", "pipe", "sub/b.ckpt"]
    assert model_names([tmp_path], vae=True) == ["a.safetensors", "sub/b.ckpt"]
    assert model_names([tmp_path / "missing"]) == []


def test_demo_is_made_once_and_loads(tmp_path):
    models, images = ensure_demo(tmp_path)
    stamp = (models / DEMO_MODEL / "model_index.json").stat().st_mtime_ns
    assert ensure_demo(tmp_path) == (models, images)
    assert (models / DEMO_MODEL / "model_index.json").stat().st_mtime_ns == stamp
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 12 and all(p.with_suffix(".txt").read_text().startswith("a ") for p in pngs)
    bundle = load_model(models / DEMO_MODEL)
    assert bundle.family.name == "sd1" and not bundle.v_pred
    assert StandaloneHost(tmp_path / "out", [models]).list_models() == [DEMO_MODEL]


def test_engine_renders_samples_with_the_network(tmp_path, logs):
    data = make_images(tmp_path / "data")
    seen = []
    cfg = quick_config(data, train_iterations=3, sample_every_n_steps=2, sample_prompts="pattern 0\npattern 1",
                       sample_steps=2)
    Trainer(cfg, MemoryHost(tmp_path / "out"), device="cpu",
            listeners=[lambda p: seen.append(list(p.samples)) if p.samples and p.samples not in seen else None]).run()
    folder = tmp_path / "out" / "tiny_samples"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "tiny_000002steps_0.png", "tiny_000002steps_1.png", "tiny_000003steps_0.png", "tiny_000003steps_1.png"]
    assert [len(s) for s in seen] == [2, 2]
    with Image.open(folder / "tiny_000003steps_0.png") as img:
        assert img.size == (64, 64)
    with pytest.raises(ConfigError, match="sample_prompts"):
        quick_config(data, sample_every_n_steps=2).validate()
