"""Options for the evaluation grid rendered after a run."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param


@dataclass
class GridOptions:
    eval_grid: bool = param("bool", False, "Evaluation grid", "After the run, render a grid: saved steps down, LoRA strengths across, for each prompt.")
    eval_grid_strengths: str = param("str", "0, 0.5, 0.75, 1.0", "Grid strengths", "LoRA strengths across the grid, comma-separated.")
    eval_grid_prompts: str = param("text", "", "Grid prompts", "One prompt per line; empty uses the sample prompts or the mode's own prompts.")
    eval_grid_seed: int = param("int", 1, "Grid seed", "Seed of every grid cell, so the cells differ only by step and strength.", minimum=0, maximum=2**63 - 1)

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
