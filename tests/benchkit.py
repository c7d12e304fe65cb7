"""Shared checks of the family P1 benches (bench/flux_step.py, sd3_step.py, zimage_step.py, on
bench/familybench.py): the bare loss is the engine's, the tiny run's JSON line, the option defaults."""
from __future__ import annotations

import json
from types import ModuleType
from typing import Callable

import torch

from bench.familybench import PROMPT
from trainer.families.textenc import encode_prompts


def assert_bare_loss_is_engine_loss(bundle, cfg, family_cls: type, pixels: int, bare_step: Callable):
    """Same generator draws (noise, then σ): the loss of `bare_step(transformer, cond, latents)` equals
    the family's noise/σ/denoise/target/loss chain. Returns the prompt's encoding, for the caller's checks."""
    cpu = torch.device("cpu")
    family_cls().prepare(bundle, cfg, cpu)
    with torch.no_grad():
        cond = encode_prompts(bundle, [PROMPT])
        latents = torch.randn((1, 16, pixels // 8, pixels // 8), generator=torch.Generator().manual_seed(2))
        bare_loss = bare_step(bundle.unet, cond, latents)(torch.Generator().manual_seed(3))
        family, gen = bundle.family, torch.Generator().manual_seed(3)
        noise = torch.randn(latents.shape, generator=gen)
        sigma = family.sample_timesteps(cfg, 1, tuple(latents.shape), generator=gen, device=cpu)
        noisy = family.noisy_input(None, latents, noise, sigma)
        pred = family.denoise(bundle, noisy, sigma, cond, None, device=cpu, dtype=torch.float32)
        target = family.target(None, latents, noise, sigma, False)
        engine_loss, _ = family.make_loss(cfg, None, v_pred=False, device=cpu)(pred.float(), target, sigma, None)
    assert 0.0 < sigma.item() < 1.0
    assert torch.allclose(bare_loss, engine_loss, rtol=1e-5, atol=0), (float(bare_loss), float(engine_loss))
    return cond


def run_tiny_bench(module: ModuleType, monkeypatch, capsys, tmp_path) -> dict:
    """The quickest form on the tiny transformer (one round of 3 steps) and the JSON line's common
    fields: bare = LyCORIS, one ratio, positive times, the run's settings and environment."""
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path))  # restored afterwards; the bench repoints both at its own
    monkeypatch.setenv("TRAINDECK_JSONS", str(tmp_path))  # temporary folder
    threads = torch.get_num_threads()
    summary = module.main(["--quick", "--size", "tiny", "--steps", "3", "--warmup", "1", "--rounds", "1",
                           "--threads", str(threads)])
    assert torch.get_num_threads() == threads
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["network_params"] == summary["bare_params"] > 0
    assert summary["check_rel_err"] < 1e-4
    assert len(summary["ratios_by_round"]) == 1 and summary["P1"] == summary["ratios_by_round"][0] > 0
    assert summary["ms_per_step"]["trainer"] > 0 and summary["ms_per_step"]["bare"] > 0
    assert summary["P1_cpu"] > 0
    assert summary["threads"] == threads and summary["quick"] is True
    assert (summary["image_tokens"], summary["size"]) == (16, "tiny")
    for key in ("load_avg_start", "load_avg_end", "torch", "diffusers", "lycoris", "cpu", "transformer_params"):
        assert key in summary
    return summary


def assert_quick_and_full_defaults(module: ModuleType) -> None:
    quick, full = module.parse_args(["--quick"]), module.parse_args([])
    assert (quick.steps, quick.warmup, quick.rounds) == (12, 3, 2)
    assert (full.steps, full.warmup, full.rounds) == (30, 6, 4)
