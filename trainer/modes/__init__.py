"""Training modes: each a small strategy over the engine's one loop."""
from __future__ import annotations

from .base import Mode, PassInfo, PassSpec, StepContext


def get_mode(name: str) -> Mode:
    """A fresh strategy for a mode name from the schema (one per job: it may cache data between passes)."""
    from ..config.params import ConfigError

    if name == "LoRA":
        from .lora import LoraMode

        return LoraMode()
    if name == "iLECO":
        from .ileco import IlecoMode

        return IlecoMode()
    if name == "Difference":
        from .difference import DifferenceMode

        return DifferenceMode()
    if name in ("ADDifT", "Multi-ADDifT"):
        from .addift import AddiftMode

        return AddiftMode(name)
    raise ConfigError("mode", name, "unknown mode")


__all__ = ["Mode", "PassInfo", "PassSpec", "StepContext", "get_mode"]
