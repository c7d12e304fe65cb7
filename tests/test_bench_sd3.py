"""bench/sd3_step.py, P1's SD3 row: its bare step is the engine's SD3 objective, and the bench runs end to end."""
from __future__ import annotations

import json

import torch

from bench import sd3_step
from trainer.families.sd3 import SD3
from trainer.families.textenc import encode_prompts


def test_bare_step_loss_is_the_engine_sd3_objective(tmp_path):
    """Same generator draws (noise, then σ): the bare loss equals the family's noise/σ/denoise/target/loss chain."""
    size = sd3_step.SIZES["tiny"]
    bundle = sd3_step.sd3_bundle(size)
    cfg = sd3_step.sd3_config(tmp_path, 1, "check", size)
    cpu = torch.device("cpu")
    SD3().prepare(bundle, cfg, cpu)
    with torch.no_grad():
        cond = encode_prompts(bundle, ["pattern 0, checkers"])
        assert cond.hidden.shape[1] == 77 + size["t5_tokens"]
        latents = torch.randn((1, 16, size["pixels"] // 8, size["pixels"] // 8), generator=torch.Generator().manual_seed(2))
        bare_loss = sd3_step.sd3_step_loss(bundle.unet, latents, cond.hidden, cond.pooled)(torch.Generator().manual_seed(3))
        family, gen = bundle.family, torch.Generator().manual_seed(3)
        noise = torch.randn(latents.shape, generator=gen)
        sigma = family.sample_timesteps(cfg, 1, tuple(latents.shape), generator=gen, device=cpu)
        noisy = family.noisy_input(None, latents, noise, sigma)
        pred = family.denoise(bundle, noisy, sigma, cond, None, device=cpu, dtype=torch.float32)
        target = family.target(None, latents, noise, sigma, False)
        engine_loss, _ = family.make_loss(cfg, None, v_pred=False, device=cpu)(pred.float(), target, sigma, None)
    assert 0.0 < sigma.item() < 1.0
    assert torch.allclose(bare_loss, engine_loss, rtol=1e-5, atol=0), (float(bare_loss), float(engine_loss))


def test_sd3_bench_runs_and_reports_matching_parameter_counts(monkeypatch, capsys, tmp_path):
    """The quickest form on the tiny transformer: one round, the JSON line's fields, bare = LyCORIS."""
    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path))
    monkeypatch.setenv("TRAINDECK_JSONS", str(tmp_path))
    threads = torch.get_num_threads()
    summary = sd3_step.main(["--quick", "--size", "tiny", "--steps", "3", "--warmup", "1", "--rounds", "1",
                             "--threads", str(threads)])
    assert torch.get_num_threads() == threads
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["network_params"] == summary["bare_params"] > 0
    # block 0: 18 Linear layers (x and context attention, MMDiT-X attention, two MLPs, two modulations);
    # block 1 (the last, context pre-only): x attention 4, context q/k/v 3, x MLP 2, modulations 2
    assert summary["modules"] == 18 + 11
    assert summary["check_rel_err"] < 1e-4
    assert len(summary["ratios_by_round"]) == 1 and summary["P1"] == summary["ratios_by_round"][0] > 0
    assert summary["ms_per_step"]["trainer"] > 0 and summary["ms_per_step"]["bare"] > 0
    assert (summary["image_tokens"], summary["text_tokens"], summary["size"]) == (16, 85, "tiny")
    for key in ("load_avg_start", "load_avg_end", "torch", "diffusers", "lycoris", "cpu", "transformer_params"):
        assert key in summary


def test_quick_and_full_defaults():
    quick, full = sd3_step.parse_args(["--quick"]), sd3_step.parse_args([])
    assert (quick.steps, quick.warmup, quick.rounds) == (12, 3, 2)
    assert (full.steps, full.warmup, full.rounds) == (30, 6, 4)
