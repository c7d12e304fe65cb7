"""The settings of some model families only (FLUX's flow options) are marked as such in the CLI's
--help (the REST API's /schema lists their `families`: tests/test_api.py)."""
from __future__ import annotations

import subprocess
import sys

from trainer.config.schema import TrainConfig
from trainer.paths import ROOT

FLUX_FIELDS = {"guidance_scale", "blocks_to_swap", "fp8_base", "split_qkv", "train_t5xxl"}
SHARED_FIELDS = {"clip_l", "t5xxl", "ae", "t5xxl_max_token_length", "apply_t5_attn_mask"}  # SD3 uses them too
ZIMAGE_SHARED = {"timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type"}
ALL_FLOW = {"weighting_scheme", "logit_mean", "logit_std", "mode_scale"}
SD3_FIELDS = {"clip_g", "training_shift"}


def _entries(text: str) -> dict[str, str]:
    """--help's settings listing: {preset key: its description, unwrapped}."""
    entries: dict[str, str] = {}
    key = None
    for line in text.split("settings (use with --set", 1)[1].splitlines()[2:]:
        if line.startswith("      "):
            entries[key] = f"{entries[key]} {line.strip()}".strip()
        elif line.startswith("  ") and line.strip():
            key = line.strip()
            entries[key] = ""
    return entries


def test_help_marks_the_family_fields_with_their_families():
    text = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=120).stdout
    entries = _entries(text)
    assert set(entries) == {p.key for _, p in TrainConfig.params()}
    marked = {key for key, body in entries.items() if body.endswith("[FLUX.1 only]")}
    assert marked == {p.key for _, p in TrainConfig.params() if p.families == ("flux",)} and FLUX_FIELDS <= marked
    assert {key for key, body in entries.items() if body.endswith("[FLUX.1, SD3.5 only]")} == SHARED_FIELDS
    assert {key for key, body in entries.items() if body.endswith("[FLUX.1, Z-Image only]")} == ZIMAGE_SHARED
    assert {key for key, body in entries.items() if body.endswith("[FLUX.1, SD3.5, Z-Image only]")} == ALL_FLOW
    assert {key for key, body in entries.items() if body.endswith("[SD3.5 only]")} == SD3_FIELDS
    assert " only]" not in entries["network_rank"] and " only]" not in entries["model"]
    zimage = {key for key, body in entries.items() if body.endswith("[Z-Image only]")}
    assert zimage == {p.key for _, p in TrainConfig.params() if p.families == ("zimage",)} == {"qwen3", "qwen3_max_token_length"}
