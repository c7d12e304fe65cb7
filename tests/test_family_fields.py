"""The settings of some model families only (FLUX's flow options) are marked as such wherever the
schema is listed: the REST API's /schema and the CLI's --help."""
from __future__ import annotations

import subprocess
import sys

from trainer.config.schema import TrainConfig
from trainer.jobs.api import schema
from trainer.paths import ROOT

FLUX_FIELDS = {"clip_l", "t5xxl", "ae", "guidance_scale", "timestep_sampling", "sigmoid_scale",
               "discrete_flow_shift", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
               "model_prediction_type", "t5xxl_max_token_length", "apply_t5_attn_mask"}


def test_the_api_schema_lists_the_flux_fields_with_their_family():
    rows = {r["name"]: r for r in schema()}
    assert {n for n, r in rows.items() if r["families"]} == FLUX_FIELDS
    for name in FLUX_FIELDS:
        assert rows[name]["families"] == ["flux"] and rows[name]["group"] == "flow", name
    assert rows["network_rank"]["families"] == [] and rows["train_snr_gamma"]["families"] == []
    assert rows["discrete_flow_shift"]["default"] == 3.1582 and rows["guidance_scale"]["default"] == 1.0


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


def test_help_marks_the_flux_fields_as_flux_only():
    text = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=120).stdout
    entries = _entries(text)
    assert set(entries) == {p.key for _, p in TrainConfig.params()}
    marked = {key for key, body in entries.items() if body.endswith("[FLUX only]")}
    assert marked == FLUX_FIELDS
    assert "[FLUX only]" not in entries["network_rank"] and "[FLUX only]" not in entries["model"]
