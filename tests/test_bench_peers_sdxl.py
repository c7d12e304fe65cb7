"""bench/peers.py --family sdxl: its arguments, its model's layout, the peers' command lines and the runner's patch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peerkit, peers, peerstats, peersxl  # noqa: E402

LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
XL_TRAINABLE = 12_181_504  # rank 16 on the 722 layers, as the three programs counted it


def parse(monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["peers.py", *argv])
    return peers.parse_args()


def test_family_defaults_to_sd1_and_takes_sdxl(monkeypatch, tmp_path):
    for var in ("TRAINDECK_KOHYA", "TRAINDECK_KOHYA_PYTHON", "TRAINDECK_DIFFUSERS", "TRAINDECK_DIFFUSERS_PYTHON"):
        monkeypatch.delenv(var, raising=False)
    assert parse(monkeypatch).family == "sd1"
    args = parse(monkeypatch, "--family", "sdxl", "--kohya", str(tmp_path), "--kohya-python", "py")
    assert (args.family, args.kohya) == ("sdxl", str(tmp_path))
    assert peers.PEFT_TARGETS.split(",") == list(LORA_LAYERS)


@pytest.mark.parametrize("argv, message", [
    (["--family", "sd3"], "invalid choice: 'sd3'"),
    (["--family", "sdxl", "--kohya", "."], "--kohya needs --kohya-python"),
    (["--family", "sdxl", "--steps", "5", "--warmup", "4"], "--steps (5) must exceed --warmup (4)"),
    (["--family", "sdxl", "--rounds", "1"], "--rounds must be 2 or more"),
])
def test_bad_arguments_are_refused_by_name(monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit):
        parse(monkeypatch, *argv)
    assert message in capsys.readouterr().err


def fake_run(trainable: int, rate: float) -> dict:
    marks = [(105 + i / rate, 50 + i / rate, 10 + i) for i in range(8)]
    return {"marks": marks, "trainable": trainable, "optimizer": "AdamW", "peak_rss_bytes": 2**30,
            "threads": 2, "spawned": 100.0, "load_before": [1.0], "load_after": [1.0]}


def test_no_ratio_against_a_peer_that_trains_a_different_count():
    runs = {"project": [fake_run(XL_TRAINABLE, 1.0)] * 2, "kohya": [fake_run(XL_TRAINABLE, 0.5)] * 2,
            "diffusers": [fake_run(XL_TRAINABLE - 2560, 0.5)] * 2}
    over = peerstats.summarize(runs, warmup=1)["project_over"]
    assert over["kohya"]["steps_per_s"] == pytest.approx(2.0)
    assert set(over["diffusers"]) == {"refused"}
    assert f"project {XL_TRAINABLE}, diffusers {XL_TRAINABLE - 2560}" in over["diffusers"]["refused"]


@pytest.fixture(scope="module")
def unet():
    return peersxl.sdxl_unet()


def test_unet_has_sdxl_layout_at_the_width_kohya_is_patched_to(unet):
    cfg = unet.config
    assert tuple(cfg.block_out_channels) == (64, 128, 256)
    assert cfg.addition_embed_type == "text_time" and cfg.cross_attention_dim == 2048
    # kohya's SDXL U-Net: Linear(MODEL_CHANNELS, 4x) time embedding, Linear(2816, 4x) label embedding
    c = peersxl.XL_CHANNELS[0]
    assert unet.time_embedding.linear_1.weight.shape == (4 * c, c)
    assert unet.add_embedding.linear_1.weight.shape == (4 * c, 2816)
    depths = {name: len(block.attentions[0].transformer_blocks) for name, block in
              [("down1", unet.down_blocks[1]), ("down2", unet.down_blocks[2]), ("mid", unet.mid_block),
               ("up0", unet.up_blocks[0]), ("up1", unet.up_blocks[1])]}
    assert depths == {"down1": 2, "down2": 10, "mid": 10, "up0": 10, "up1": 2}
    assert not hasattr(unet.down_blocks[0], "attentions") and not hasattr(unet.up_blocks[2], "attentions")
    for level, block in ((1, unet.down_blocks[1]), (2, unet.down_blocks[2])):
        attn = block.attentions[0].transformer_blocks[0]
        assert attn.attn1.heads == peersxl.XL_CHANNELS[level] // 64  # heads of 64 channels, as kohya builds them
        assert attn.attn2.to_k.in_features == 2048
        assert isinstance(block.attentions[0].proj_in, torch.nn.Linear)


def test_the_lora_layers_are_sdxls_722_and_count_what_the_programs_counted(unet):
    layers = [m for name, m in unet.named_modules() if ".attentions." in name and isinstance(m, torch.nn.Linear)
              and name.endswith(LORA_LAYERS)]
    assert len(layers) == 722
    assert sum(peersxl.RANK * (m.in_features + m.out_features) for m in layers) == XL_TRAINABLE


def test_text_encoders_give_sdxls_context_and_pooled_widths():
    te1, te2 = peersxl.sdxl_text_encoders()
    ids = torch.tensor([[49406, 320, 49407] + [49407] * 74])
    with torch.no_grad():
        out1 = te1(ids, output_hidden_states=True)
        out2 = te2(ids, output_hidden_states=True)
    assert len(out1.hidden_states) == 13  # kohya takes [11], the penultimate, as the others do with [-2]
    assert torch.equal(out1.hidden_states[11], out1.hidden_states[-2])
    assert out1.hidden_states[-2].shape[-1] + out2.hidden_states[-2].shape[-1] == peersxl.CONTEXT_DIM == 2048
    assert out2.text_embeds.shape == (1, 1280) and peersxl.ADM_DIM == 1280 + 6 * 256 == 2816


def test_kohya_finds_both_tokenizers_in_the_cache(tmp_path):
    model = tmp_path / "model"
    for sub in ("tokenizer", "tokenizer_2"):
        (model / sub).mkdir(parents=True)
        (model / sub / "vocab.json").write_text(sub, encoding="utf-8")
    cache = peersxl.write_sdxl_tokenizer_cache(model, tmp_path / "tok")
    assert (cache / "openai_clip-vit-large-patch14" / "vocab.json").read_text() == "tokenizer"
    assert (cache / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k" / "vocab.json").read_text() == "tokenizer_2"


def test_peer_command_lines(tmp_path):
    kohya = peersxl.kohya_sdxl_cmd("py", peers.RUNNER, tmp_path / "sd", tmp_path, tmp_path / "m", tmp_path / "d", 9)
    assert kohya[kohya.index("--sdxl-unet-channels") + 1] == "64"
    assert kohya[kohya.index("--script") + 1] == str(tmp_path / "sd" / "sdxl_train_network.py")
    assert {"--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"} <= set(kohya)
    assert kohya[kohya.index("--resolution") + 1] == "128,128" and kohya[kohya.index("--max_train_steps") + 1] == "9"
    example = peersxl.diffusers_sdxl_cmd("py", peers.RUNNER, tmp_path / "df", tmp_path, tmp_path / "m",
                                         tmp_path / "d", 9, peers.PEFT_TARGETS)
    assert example[example.index("--peft-targets") + 1] == peers.PEFT_TARGETS
    assert example[example.index("--script") + 1].endswith("examples/text_to_image/train_text_to_image_lora_sdxl.py")
    assert example[example.index("--rank") + 1] == "16" and "--train_text_encoder" not in example
    project = peers.project_cmd(tmp_path, tmp_path / "m", tmp_path / "d", 9, pixels=128)
    preset = json.loads((tmp_path / "project-preset.json").read_text(encoding="utf-8"))
    assert preset["image_size(height, width)"] == "128" and preset["image_min_length"] == 128
    assert preset["train_iterations"] == 9
    assert project[project.index("--model") + 1] == str(tmp_path / "m")


def test_runner_sets_kohyas_sdxl_widths_before_the_script_runs(tmp_path):
    lib = tmp_path / "checkout" / "library"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("", encoding="utf-8")
    (lib / "sdxl_original_unet.py").write_text("MODEL_CHANNELS = 320\nTIME_EMBED_DIM = 320 * 4\n", encoding="utf-8")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from library import sdxl_original_unet as su
        print(su.MODEL_CHANNELS, su.TIME_EMBED_DIM)
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.AdamW([p])
        for _ in range(2):
            p.sum().backward(); opt.step()
    """), encoding="utf-8")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(peers.RUNNER), "--out", str(out), "--sys-path",
                           str(tmp_path / "checkout"), "--sdxl-unet-channels", "64", "--script", str(script)],
                          check=True, capture_output=True, text=True)
    assert proc.stdout.split() == ["64", "256"]
    assert json.loads(out.read_text(encoding="utf-8"))["trainable"] == 3


def test_stand_in_has_what_the_sdxl_example_imports(tmp_path):
    folder = peerkit.write_torchvision_stub(tmp_path / "stub")
    code = textwrap.dedent("""
        import numpy as np
        from PIL import Image
        from torchvision import transforms
        from torchvision.transforms.functional import crop
        img = Image.fromarray((np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(30, 40, 3))
        transforms.RandomHorizontalFlip(p=1.0)
        assert np.array_equal(np.asarray(crop(img, 5, 7, 10, 20)), np.asarray(img)[5:15, 7:27])
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
