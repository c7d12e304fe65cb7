"""Where a job writes its networks, checked before training starts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .fsutil import check_name
from .params import ConfigError


@dataclass(frozen=True)
class OutputPlan:
    """The final file of a pass and its intermediate saves, by step."""

    final: Path
    intermediate: dict[int, Path]

    def all(self) -> list[Path]:
        return [self.final, *self.intermediate.values()]


def save_steps(iterations: int, every: int) -> list[int]:
    """Steps at which an intermediate file is written (not the last step)."""
    if every <= 0:
        return []
    return [s for s in range(every, iterations, every)]


def plan_outputs(cfg: TrainConfig, lora_dir: Path, suffix: str = "") -> OutputPlan:
    """Paths for one pass; refuses up front any that would overwrite a file.

    Checking before training means an hour of work is never lost to a name clash
    at the end.
    """
    check_name("save_lora_name", cfg.save_lora_name)
    base = f"{cfg.save_lora_name}{suffix}"
    final = Path(lora_dir) / f"{base}.safetensors"
    inter = {s: Path(lora_dir) / f"{base}_{s}steps.safetensors" for s in save_steps(cfg.train_iterations, cfg.save_per_steps)}
    plan = OutputPlan(final, inter)
    if not cfg.save_overwrite:
        taken = [p for p in plan.all() if p.exists()]
        if taken:
            raise ConfigError("save_lora_name", cfg.save_lora_name,
                              f"{taken[0]} already exists; choose another name or set save_overwrite")
    return plan
