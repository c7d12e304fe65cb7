"""bench/zimage_step.py, P1's Z-Image row: its bare step is the engine's Z-Image objective, and the bench
runs end to end. Runs where diffusers has Z-Image."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.families.textenc import encode_prompts
from trainer.families.zimage import ZImage, caption_list

pytestmark = pytest.mark.needs_zimage


def test_bare_step_loss_is_the_engine_zimage_objective(tmp_path):
    """Same generator draws (noise, then σ): the bare loss equals the family's noise/σ/denoise/target/loss chain."""
    from bench import zimage_step

    size = zimage_step.SIZES["tiny"]
    bundle = zimage_step.zimage_bundle(size)
    cfg = zimage_step.zimage_config(tmp_path, 1, "check", size)
    cpu = torch.device("cpu")
    ZImage().prepare(bundle, cfg, cpu)
    with torch.no_grad():
        cond = encode_prompts(bundle, [zimage_step.PROMPT])
        latents = torch.randn((1, 16, size["pixels"] // 8, size["pixels"] // 8), generator=torch.Generator().manual_seed(2))
        bare_loss = zimage_step.zimage_step_loss(bundle.unet, latents, caption_list(cond))(torch.Generator().manual_seed(3))
        family, gen = bundle.family, torch.Generator().manual_seed(3)
        noise = torch.randn(latents.shape, generator=gen)
        sigma = family.sample_timesteps(cfg, 1, tuple(latents.shape), generator=gen, device=cpu)
        noisy = family.noisy_input(None, latents, noise, sigma)
        pred = family.denoise(bundle, noisy, sigma, cond, None, device=cpu, dtype=torch.float32)
        target = family.target(None, latents, noise, sigma, False)
        engine_loss, _ = family.make_loss(cfg, None, v_pred=False, device=cpu)(pred.float(), target, sigma, None)
    assert 0.0 < sigma.item() < 1.0
    assert torch.allclose(bare_loss, engine_loss, rtol=1e-5, atol=0), (float(bare_loss), float(engine_loss))


def test_zimage_bench_runs_and_reports_matching_parameter_counts(monkeypatch, capsys, tmp_path):
    """The quickest form on the tiny transformer: one round, the JSON line's fields, bare = LyCORIS."""
    from bench import zimage_step

    monkeypatch.setenv("TRAINDECK_LOGS", str(tmp_path))
    monkeypatch.setenv("TRAINDECK_JSONS", str(tmp_path))
    threads = torch.get_num_threads()
    summary = zimage_step.main(["--quick", "--size", "tiny", "--steps", "3", "--warmup", "1", "--rounds", "1",
                                "--threads", str(threads)])
    assert torch.get_num_threads() == threads
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["network_params"] == summary["bare_params"] > 0
    assert summary["modules"] == 23  # 8 Linear layers in the layer and in the noise refiner, 7 in the context refiner
    assert summary["check_rel_err"] < 1e-4
    assert len(summary["ratios_by_round"]) == 1 and summary["P1"] == summary["ratios_by_round"][0] > 0
    assert summary["ms_per_step"]["trainer"] > 0 and summary["ms_per_step"]["bare"] > 0
    assert (summary["image_tokens"], summary["size"]) == (16, "tiny") and summary["caption_tokens"] > 5
    assert summary["threads"] == threads and summary["quick"] is True
