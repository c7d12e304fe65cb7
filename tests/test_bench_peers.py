"""bench/peers.py's parts: the in-process step timer, the figures and ratios, the data and the stand-in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peerkit, peerstats  # noqa: E402

TRAIN = textwrap.dedent("""
    import sys, torch
    torch.manual_seed(0)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    lora = torch.nn.Linear(8, 3)
    opt = torch.optim.AdamW([{"params": list(lora.parameters())}, {"params": list(frozen.parameters())}], lr=1e-3)
    for _ in range(int(sys.argv[1])):
        loss = lora(frozen(torch.randn(4, 8))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
""")


def run_runner(tmp_path: Path, *extra: str, steps: int = 6) -> dict:
    script = tmp_path / "train.py"
    script.write_text(TRAIN, encoding="utf-8")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "peerrun.py"), "--out", str(out), *extra,
                    "--script", str(script), "--", str(steps)], check=True, capture_output=True, text=True)
    return json.loads(out.read_text(encoding="utf-8"))


def test_runner_marks_every_step_and_counts_only_trainable_parameters(tmp_path):
    data = run_runner(tmp_path)
    assert len(data["marks"]) == 6
    assert data["trainable"] == 8 * 3 + 3  # the frozen layer's 72 are in the optimizer but do not train
    assert data["optimizer"] == "AdamW"
    epochs = [m[0] for m in data["marks"]]
    assert epochs == sorted(epochs)
    assert data["peak_rss_bytes"] > 10 * 2**20


def test_runner_profiles_the_asked_window(tmp_path):
    data = run_runner(tmp_path, "--profile", "2,5")
    assert data["ops"], "no ops recorded"
    calls, ms = data["ops"]["aten::addmm"]
    assert calls == pytest.approx(2.0)  # two Linear forwards per step, 3 steps in the window
    assert ms > 0


def fake_run(trainable: int, rate: float, cpu: float, steps: int = 8, spawned: float = 100.0) -> dict:
    marks = [(spawned + 5 + i / rate, 50 + i / rate, 10 + i * cpu) for i in range(steps)]
    return {"marks": marks, "trainable": trainable, "optimizer": "AdamW", "peak_rss_bytes": 512 * 2**20,
            "threads": 2, "spawned": spawned, "load_before": [1.0], "load_after": [1.0]}


def test_one_stretched_step_moves_the_window_rate_but_not_the_median_step():
    run = fake_run(100, rate=2.0, cpu=0.5, steps=10)
    run["marks"] = [m if i < 6 else (m[0] + 4.5, m[1] + 4.5, m[2]) for i, m in enumerate(run["marks"])]
    fig = peerstats.round_figures(run, warmup=1)
    assert fig["median_step_s"] == pytest.approx(0.5)
    assert fig["min_step_s"] == pytest.approx(0.5)
    assert fig["steps_per_s"] == pytest.approx(8 / 8.5, abs=1e-4)


def test_figures_from_marks_after_warmup():
    fig = peerstats.round_figures(fake_run(100, rate=2.0, cpu=0.75), warmup=2)
    assert fig["steps_per_s"] == pytest.approx(2.0)
    assert fig["cpu_s_per_step"] == pytest.approx(0.75)
    assert fig["cores_busy"] == pytest.approx(1.5)
    assert fig["startup_s"] == pytest.approx(5.0)
    assert fig["peak_rss_mib"] == 512.0
    with pytest.raises(ValueError, match="optimizer steps recorded"):
        peerstats.round_figures(fake_run(100, 2.0, 0.5, steps=3), warmup=2)


def test_ratios_per_peer_and_refused_when_trainable_counts_differ():
    runs = {"project": [fake_run(100, 3.0, 1.0), fake_run(100, 1.0, 1.0)],
            "kohya": [fake_run(100, 1.0, 2.0), fake_run(100, 1.0, 2.0)],
            "diffusers": [fake_run(99, 1.0, 1.0), fake_run(99, 1.0, 1.0)]}
    out = peerstats.summarize(runs, warmup=1)
    assert out["programs"]["project"]["steps_per_s"] == pytest.approx(2.0)  # median of 3 and 1
    kohya = out["project_over"]["kohya"]
    assert kohya["steps_per_s"] == pytest.approx(2.0)
    assert kohya["cpu_s_per_step"] == pytest.approx(0.5)
    assert kohya["steps_per_s_by_round"] == [pytest.approx(3.0), pytest.approx(1.0)]
    assert kohya["median_step_by_round"] == [pytest.approx(3.0), pytest.approx(1.0)]
    assert kohya["steps_per_s_from_median_step"] == pytest.approx(1.5)  # 1 s against the median of 1/3 and 1 s
    assert "steps_per_s" not in out["project_over"]["diffusers"]
    assert "trainable parameters differ: project 100, diffusers 99" in out["project_over"]["diffusers"]["refused"]


def test_op_diff_ranks_ops_by_the_largest_gap():
    ops = {"project": {"aten::mul": [10, 5.0], "aten::mm": [4, 20.0]},
           "kohya": {"aten::mm": [4, 19.5], "aten::add": [2, 1.0]}}
    diff = peerstats.op_diff(ops)
    assert diff["total"] == {"project": 25.0, "kohya": 20.5}
    assert diff["by_op"][0] == ["aten::mul", 5.0, 0.0]
    assert [row[0] for row in diff["by_op"]] == ["aten::mul", "aten::add", "aten::mm"]


def test_data_layout_for_each_program(tmp_path):
    folders = peerkit.write_data(tmp_path / "data", 3)
    assert sorted(p.name for p in folders["project"].glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    assert folders["kohya"] == folders["project"].parent and folders["project"].name == "1_bench"
    meta = [json.loads(line) for line in (folders["diffusers"] / "metadata.jsonl").read_text().splitlines()]
    assert meta[1] == {"file_name": "img1.png", "text": (folders["project"] / "img1.txt").read_text()}


def test_torchvision_stand_in_matches_the_transforms_it_replaces(tmp_path):
    folder = peerkit.write_torchvision_stub(tmp_path / "stub")
    code = textwrap.dedent("""
        import sys, numpy as np, torch
        from PIL import Image
        from torchvision import transforms
        img = Image.fromarray((np.arange(300 * 200 * 3) % 251).astype(np.uint8).reshape(200, 300, 3))
        t = transforms.Compose([transforms.Resize(100, interpolation=transforms.InterpolationMode.BILINEAR),
                                transforms.CenterCrop(100), transforms.Lambda(lambda x: x),
                                transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(img)
        ref = np.asarray(img.resize((150, 100), Image.BILINEAR).crop((25, 0, 125, 100)), dtype=np.float32)
        ref = torch.from_numpy(ref / 255.0).permute(2, 0, 1) * 2 - 1
        assert t.shape == (3, 100, 100), t.shape
        assert torch.allclose(t, ref, atol=1e-6)
        print(transforms.functional.pil_to_tensor(img).shape)
    """)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.Size([3, 200, 300])"
