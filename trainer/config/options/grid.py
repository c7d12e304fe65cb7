"""Options for the evaluation grid rendered after a run (trainer/training/evalgrid.py draws it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..params import ConfigError, param

MAX_STRENGTHS = 16   # columns
MAX_PROMPTS = 8      # prompt blocks
MAX_SAVES = 32       # rows: saved files of the result's pass
MAX_CELLS = 256      # images in one grid (rows x strengths x prompts)
MAX_ABS_STRENGTH = 100.0  # the same bound as network_strength
EMPTY_PROMPT = "(empty prompt)"  # how the grid labels iLECO's empty target (an erase)


def parse_strengths(text: str) -> list[float]:
    """Comma- (or space-) separated strengths; ConfigError on eval_grid_strengths otherwise."""
    items = [t for t in str(text).replace(",", " ").split() if t]
    if not items:
        raise ConfigError("eval_grid_strengths", text, "is empty; give strengths such as '0, 0.5, 1'")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ConfigError("eval_grid_strengths", text, f"{item!r} is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_ABS_STRENGTH:
            raise ConfigError("eval_grid_strengths", text,
                              f"{item!r} must be a finite number within ±{MAX_ABS_STRENGTH:g}")
        values.append(value)
    if len(values) > MAX_STRENGTHS:
        raise ConfigError("eval_grid_strengths", text,
                          f"has {len(values)} strengths; the grid takes at most {MAX_STRENGTHS} columns")
    return values


@dataclass
class GridOptions:
    eval_grid: bool = param("bool", False, "Evaluation grid", "After the run, render one PNG next to the LoRA (<name>_grid.png): the saved files (save_per_steps and the final one) down, LoRA strengths across, one block per prompt, at a fixed seed. Costs saves × strengths × prompts images at sample_steps.", group="samples")
    eval_grid_strengths: str = param("str", "0, 0.5, 0.75, 1.0", "Grid strengths", f"LoRA strengths across the grid, comma-separated (at most {MAX_STRENGTHS}); a strength is the weight the file is used at, as <lora:name:weight>.", group="samples")
    eval_grid_prompts: str = param("text", "", "Grid prompts", f"One prompt per line (at most {MAX_PROMPTS}); empty uses the sample prompts, else the mode's own prompts. iLECO always adds its original and target prompts.", group="samples")
    eval_grid_seed: int = param("int", 1, "Grid seed", "Seed of the grid: prompt i is drawn with seed + i in every cell, so the cells of a prompt differ only by file and strength.", minimum=0, maximum=2**63 - 1, group="samples")

    def grid_strengths(self) -> list[float]:
        """The columns, parsed."""
        return parse_strengths(self.eval_grid_strengths)

    def grid_prompts(self) -> list[str]:
        """The prompt blocks: the grid prompts, else the sample prompts, else the mode's own.

        iLECO puts its original and target prompts first whatever else is given (an
        empty target, an erase, is kept: it shows what the concept should become).
        """
        from ...training.samples import parse_prompts

        given = parse_prompts(self.eval_grid_prompts) or parse_prompts(self.sample_prompts)
        mode = self.mode
        if mode == "iLECO":
            own = [self.original_prompt.strip(), self.target_prompt.strip()]
            return list(dict.fromkeys([*own, *given]))
        if given:
            return list(dict.fromkeys(given))
        if mode == "Difference":
            return parse_prompts(self.original_prompt)[:1]
        if mode == "ADDifT":
            return list(dict.fromkeys(p.strip() for p in (self.original_prompt, self.target_prompt) if p.strip()))
        return []

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
        if not self.eval_grid:
            return
        strengths = self.grid_strengths()
        prompts = self.grid_prompts()
        if not prompts:
            raise ConfigError("eval_grid_prompts", self.eval_grid_prompts,
                              f"is empty and {self.mode} has no prompts of its own; give one prompt per line "
                              "here or in sample_prompts, or turn eval_grid off")
        if len(prompts) > MAX_PROMPTS:
            raise ConfigError("eval_grid_prompts", self.eval_grid_prompts,
                              f"gives {len(prompts)} prompts; the grid takes at most {MAX_PROMPTS}")
        if self.network_strength == 0:
            raise ConfigError("eval_grid", True, "network_strength 0 saves files without effect; there is nothing to show")
        from ...training.outputs import save_steps

        rows = len(save_steps(self.train_iterations, self.save_per_steps)) + 1
        if rows > MAX_SAVES:
            raise ConfigError("save_per_steps", self.save_per_steps,
                              f"saves {rows} files; the evaluation grid takes at most {MAX_SAVES} rows "
                              "(save less often or turn eval_grid off)")
        count = rows * len(strengths) * len(prompts)
        if count > MAX_CELLS:
            raise ConfigError("eval_grid_strengths", self.eval_grid_strengths,
                              f"with {rows} saved files and {len(prompts)} prompts makes {count} images; "
                              f"the grid takes at most {MAX_CELLS} (fewer strengths, prompts or saves)")
