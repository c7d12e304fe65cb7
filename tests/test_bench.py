"""The benchmark's own bookkeeping: the start-up split from Progress events, and P2's peft check."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from bench import startup
from bench.reference import peft_missing
from trainer.training.events import Progress


def test_phase_clock_splits_start_up_in_event_order(monkeypatch):
    """Two "loading" events (Start, bundle handed over), caching, step 0, steps 1-2: each mark and peak in place."""
    rss = iter(range(10**6, 10**9, 1000))
    monkeypatch.setattr(startup, "rss_bytes", lambda: next(rss))  # before the sampler thread starts
    clock = startup.PhaseClock(interval=0.001)
    events = [("loading", 0), ("loading", 0), ("caching", 0), ("caching", 0), ("training", 0),
              ("training", 1), ("training", 1), ("training", 2)]
    for phase, step in events:
        clock(Progress(phase=phase, step=step))
        time.sleep(0.01)
    clock.close()
    m = clock.marks
    assert m["started"] < m["loaded"] < m["cache"] < m["train"] < m["step1"]
    assert set(clock.peaks) >= {"load", "build", "cache", "training"}
    assert clock.peaks["training"] > clock.peaks["cache"] > clock.peaks["load"]  # the RSS stub only grows
    assert sorted(clock.steps) == [0, 1, 2]  # the repeated step-1 event ("saved ...") is not a step


def test_split_arithmetic():
    marks = {"started": 1.0, "loaded": 3.0, "cache": 3.5, "train": 7.5, "step1": 8.25}
    got = startup.split(marks, images=4)
    assert got == {"load_s": 2.0, "build_s": 0.5, "cache_s": 4.0, "cache_per_image_s": 1.0,
                   "first_step_s": 0.75, "start_to_first_step_s": 7.25}


def test_split_without_caching_events_counts_no_cache_time():
    got = startup.split({"started": 0.0, "loaded": 1.0, "train": 2.0, "step1": 3.0}, images=2)
    assert got["cache_s"] == 0.0 and got["build_s"] == 1.0


def test_peft_missing_names_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    why = peft_missing()
    assert why is not None and "peft" in why and "requirements/bench.txt" in why


def test_device_bench_runs_on_the_cpu_and_reports_both_checkpointing_settings(monkeypatch, capsys):
    """bench/gpu.py end to end on a tiny model: both settings measured, P1 from its own rounds, no peaks on a CPU."""
    import json

    from bench import gpu
    from tests.tiny import tiny_bundle

    bundle = tiny_bundle()
    monkeypatch.setattr(gpu, "bench_bundle", lambda vae: bundle)
    summary = gpu.main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--steps", "3", "--warmup", "1", "--rounds", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    for key in ("checkpointing_off", "checkpointing_on"):
        r = summary[key]
        assert r["P1_by_round"] and r["P1"] == r["P1_by_round"][0] > 0
        assert abs(r["trainer_it_s"] - 1000.0 / r["trainer_ms"]) < 0.01
        assert r["peak_bytes_trainer"] is None and r["peak_bytes_bare"] is None  # no allocator statistics on a CPU
    assert summary["P1"] == summary["checkpointing_off"]["P1"] and summary["device_type"] == "cpu"
    if peft_missing() is None:  # the reference loop ran on the device path too
        assert summary["P2"] > 0 and len(summary["P2_by_round"]) == 1
        assert summary["P2_ms_per_step"]["peft_attention"] > 0
    else:
        assert summary["P2"] is None and "peft" in summary["P2_reason"]


def test_device_bench_peak_memory_counts_training_steps_only():
    """The peak is reset when training starts (step 0), so caching's peak is not reported as training's."""
    from bench.gpu import Memory

    calls = []

    class FakeAccel:
        def synchronize(self, device):
            calls.append("sync")

        def reset_peak_memory_stats(self, device):
            calls.append("reset")

        def max_memory_allocated(self, device):
            return 123

    mem = Memory(torch.device("cpu"))
    mem.mod = FakeAccel()
    mem.listener(Progress(phase="caching", step=0))
    mem.listener(Progress(phase="training", step=1))
    assert calls == []
    mem.listener(Progress(phase="training", step=0))
    assert calls == ["sync", "reset"] and mem.peak() == 123


def test_bare_loop_uses_autocast_and_the_frozen_dtype(monkeypatch):
    """The bare loop runs its steps inside the given autocast and feeds the U-Net its frozen weights' dtype."""
    from bench import bare

    entered, seen = [], []

    class Ctx:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    unet = torch.nn.Linear(4, 4).requires_grad_(False).to(torch.float64)
    delta = torch.nn.Linear(4, 4)
    deltas = torch.nn.ModuleList([delta]).to(torch.float64)

    def forward(x, t, cond, return_dict=False):
        seen.append((x.dtype, cond.dtype))
        return (delta(x.flatten(1)).view_as(x),)

    unet.forward = forward
    wall, cpu = bare.bare_loop(unet, deltas, steps=2, latents=torch.zeros(1, 1, 2, 2), cond=torch.zeros(1, 3, 4),
                               alphas_cumprod=torch.linspace(0.99, 0.01, 10), snr_gamma=5.0, lr=1e-3, seed=0,
                               autocast=Ctx)
    assert len(wall) == len(cpu) == 2 and len(entered) == 2
    assert seen == [(torch.float64, torch.float64)] * 2


def test_device_bench_bare_copy_runs_the_plain_layers_plus_its_own_delta_only(monkeypatch, tmp_path):
    """Each hooked layer of the bare copy calls its own original forward, not a LyCORIS hook copied along."""
    from bench import gpu
    from tests.tiny import tiny_bundle

    monkeypatch.setattr(gpu, "bench_bundle", lambda vae: tiny_bundle())
    b = gpu.GpuBench(gpu.parse_args(["--device", "cpu", "--tiny", "--dtype", "fp32"]), tmp_path)
    assert len(b.deltas) > 0
    layers = {id(m): m for m in b.bare_unet.modules()}
    for delta in b.deltas:
        layer = delta.org_forward.__self__
        assert id(layer) in layers and layer.forward == delta.forward
        assert type(layer).forward is delta.org_forward.__func__  # the layer's class forward: nn.Linear's


@pytest.mark.parametrize("layer", [torch.nn.Linear(12, 10), torch.nn.Conv2d(6, 5, 3, padding=1)])
def test_bare_loha_that_rebuilds_its_products_gives_autograds_values_and_gradients(layer):
    """--loha-recompute changes where the bare LoHa's products come from in the backward, not the math."""
    from types import SimpleNamespace

    from bench import bare

    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim = layer.weight.shape[0], layer.weight[0].numel()
    lyco = SimpleNamespace(scale=0.5, hada_w1_a=torch.randn(out_dim, 4, generator=gen),
                           hada_w1_b=torch.randn(4, in_dim, generator=gen),
                           hada_w2_a=torch.randn(out_dim, 4, generator=gen),
                           hada_w2_b=torch.randn(4, in_dim, generator=gen))
    x = torch.randn((2, 6, 5, 5) if isinstance(layer, torch.nn.Conv2d) else (2, 3, 12), generator=gen)
    results = []
    for cls in (bare.BareLoHa, bare.BareLoHaRecompute):
        delta = cls(layer, lyco)
        y = delta.delta(x)
        y.pow(2).sum().backward()
        results.append((y.detach(), [p.grad for p in delta.parameters()]))
    (y0, g0), (y1, g1) = results
    assert torch.allclose(y0, y1, rtol=1e-6, atol=1e-6)
    assert len(g0) == len(g1) == 4
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(g0, g1))


def _top_level_names(path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_trainer_import_in_the_benches_names_a_module_and_names_it_defines():
    """Imports inside functions run only when a bench runs: check them all against the package's files."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    wrong = []
    for bench_file in sorted((root / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(bench_file.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer"):
                continue
            base = root.joinpath(*node.module.split("."))
            target = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if not target.is_file():
                wrong.append(f"{bench_file.name}: no module {node.module}")
                continue
            missing = {a.name for a in node.names} - _top_level_names(target) - {"*"}
            missing = {n for n in missing if not (base / f"{n}.py").is_file()}  # a submodule is fine
            if missing:
                wrong.append(f"{bench_file.name}: {node.module} has no {sorted(missing)}")
    assert wrong == []
