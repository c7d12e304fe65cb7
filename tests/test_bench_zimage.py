"""bench/zimage_step.py, P1's Z-Image row: its bare step is the engine's Z-Image objective, and the bench
runs end to end. Runs where diffusers has Z-Image."""
from __future__ import annotations

import pytest

from tests.benchkit import assert_bare_loss_is_engine_loss, run_tiny_bench
from trainer.families.zimage import ZImage, caption_list

pytestmark = pytest.mark.needs_zimage


def test_bare_step_loss_is_the_engine_zimage_objective(tmp_path):
    """Same generator draws (noise, then σ): the bare loss equals the family's noise/σ/denoise/target/loss chain."""
    from bench import zimage_step

    size = zimage_step.SIZES["tiny"]
    assert_bare_loss_is_engine_loss(
        zimage_step.zimage_bundle(size), zimage_step.zimage_config(tmp_path, 1, "check", size), ZImage,
        size["pixels"], lambda unet, cond, latents: zimage_step.zimage_step_loss(unet, latents, caption_list(cond)))


def test_zimage_bench_runs_and_reports_matching_parameter_counts(monkeypatch, capsys, tmp_path):
    """The quickest form on the tiny transformer: one round, the JSON line's fields, bare = LyCORIS."""
    from bench import zimage_step

    summary = run_tiny_bench(zimage_step, monkeypatch, capsys, tmp_path)
    assert summary["modules"] == 23  # 8 Linear layers in the layer and in the noise refiner, 7 in the context refiner
    assert summary["caption_tokens"] > 5
