"""bench/flux_step.py, P1's FLUX row: its bare step is the engine's FLUX objective, and the bench runs end to end."""
from __future__ import annotations

from bench import flux_step
from tests.benchkit import assert_bare_loss_is_engine_loss, assert_quick_and_full_defaults, run_tiny_bench
from trainer.families.flux import Flux


def test_bare_step_loss_is_the_engine_flux_objective(tmp_path):
    """Same generator draws (noise, then σ): the bare loss equals the family's noise/σ/denoise/target/loss chain."""
    size = flux_step.SIZES["tiny"]
    cond = assert_bare_loss_is_engine_loss(
        flux_step.flux_bundle(size), flux_step.flux_config(tmp_path, 1, "check", size), Flux, size["pixels"],
        lambda unet, cond, latents: flux_step.flux_step_loss(unet, latents, cond.hidden, cond.pooled))
    assert cond.hidden.shape[1] == size["t5_tokens"]


def test_flux_bench_runs_and_reports_matching_parameter_counts(monkeypatch, capsys, tmp_path):
    """The quickest form on the tiny transformer: one round, the JSON line's fields, bare = LyCORIS."""
    summary = run_tiny_bench(flux_step, monkeypatch, capsys, tmp_path)
    assert summary["modules"] == 20  # 14 Linear layers in the double block, 6 in the single block
    assert summary["t5_tokens"] == 8


def test_quick_and_full_defaults():
    assert_quick_and_full_defaults(flux_step)
