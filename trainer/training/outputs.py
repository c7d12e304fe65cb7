"""Where a job writes its networks, checked before training starts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import TrainConfig
from ..fsutil import check_name
from ..config.params import ConfigError


@dataclass(frozen=True)
class OutputPlan:
    """The final file of a pass and its intermediate saves, by step."""

    final: Path
    intermediate: dict[int, Path]

    def all(self) -> list[Path]:
        return [self.final, *self.intermediate.values()]


def state_path(network_file: Path) -> Path:
    """The training-state folder saved next to a network file: ``<name>-state/``."""
    network_file = Path(network_file)
    return network_file.with_name(f"{network_file.stem}-state")


def find_network_file(source: str, lora_dir: Path) -> Path | None:
    """A network named by path, or by name in ``lora_dir`` (``.safetensors`` optional); None if absent."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    alt = Path(lora_dir) / (source if source.endswith(".safetensors") else f"{source}.safetensors")
    return alt if alt.is_file() else None


def resume_step(cfg: TrainConfig, lora_dir: Path) -> int:
    """The step network_resume's state folder continues from; 0 without one.

    A folder that cannot be read counts as 0 here: the pass itself reads it again and
    refuses it with a ConfigError naming network_resume.
    """
    found = find_network_file(cfg.network_resume, lora_dir) if cfg.network_resume else None
    info = state_path(found) / "state.json" if found is not None else None
    if info is None or not info.is_file():
        return 0
    try:
        step = json.loads(info.read_text(encoding="utf-8")).get("step", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


def save_steps(iterations: int, every: int) -> list[int]:
    """Steps at which an intermediate file is written (not the last step)."""
    if every <= 0:
        return []
    return [s for s in range(every, iterations, every)]


def plan_outputs(cfg: TrainConfig, lora_dir: Path, suffix: str = "") -> OutputPlan:
    """Paths for one pass; refuses up front any that would overwrite a file.

    Checking before training means an hour of work is never lost to a name clash
    at the end. With ``save_state`` the ``<name>-state/`` folders are checked too. A job that
    resumes at step k from a state folder plans no intermediate save at or before k (those
    files are the earlier run's).
    """
    check_name("save_lora_name", cfg.save_lora_name)
    base = f"{cfg.save_lora_name}{suffix}"
    final = Path(lora_dir) / f"{base}.safetensors"
    done = resume_step(cfg, lora_dir)
    steps = [s for s in save_steps(cfg.train_iterations, cfg.save_per_steps) if s > done]
    inter = {s: Path(lora_dir) / f"{base}_{s}steps.safetensors" for s in steps}
    plan = OutputPlan(final, inter)
    if not cfg.save_overwrite:
        wanted = plan.all() + ([state_path(p) for p in plan.all()] if cfg.save_state else [])
        taken = [p for p in wanted if p.exists()]
        if taken:
            raise ConfigError("save_lora_name", cfg.save_lora_name,
                              f"{taken[0]} already exists; choose another name or set save_overwrite")
    return plan
