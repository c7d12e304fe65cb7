"""bench/sd3_step.py, P1's SD3 row: its bare step is the engine's SD3 objective, and the bench runs end to end."""
from __future__ import annotations

from bench import sd3_step
from tests.benchkit import assert_bare_loss_is_engine_loss, assert_quick_and_full_defaults, run_tiny_bench
from trainer.families.sd3 import SD3


def test_bare_step_loss_is_the_engine_sd3_objective(tmp_path):
    """Same generator draws (noise, then σ): the bare loss equals the family's noise/σ/denoise/target/loss chain."""
    size = sd3_step.SIZES["tiny"]
    cond = assert_bare_loss_is_engine_loss(
        sd3_step.sd3_bundle(size), sd3_step.sd3_config(tmp_path, 1, "check", size), SD3, size["pixels"],
        lambda unet, cond, latents: sd3_step.sd3_step_loss(unet, latents, cond.hidden, cond.pooled))
    assert cond.hidden.shape[1] == 77 + size["t5_tokens"]


def test_sd3_bench_runs_and_reports_matching_parameter_counts(monkeypatch, capsys, tmp_path):
    """The quickest form on the tiny transformer: one round, the JSON line's fields, bare = LyCORIS."""
    summary = run_tiny_bench(sd3_step, monkeypatch, capsys, tmp_path)
    # block 0: 18 Linear layers (x and context attention, MMDiT-X attention, two MLPs, two modulations);
    # block 1 (the last, context pre-only): x attention 4, context q/k/v 3, x MLP 2, modulations 2
    assert summary["modules"] == 18 + 11
    assert summary["text_tokens"] == 85


def test_quick_and_full_defaults():
    assert_quick_and_full_defaults(sd3_step)
