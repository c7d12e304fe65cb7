"""Training modes: each a small strategy over the engine's one loop."""
from __future__ import annotations

from .base import Mode, PassInfo, PassSpec, StepContext


def get_mode(name: str) -> Mode:
    """The strategy for a mode name from the schema."""
    from ..params import ConfigError

    if name == "LoRA":
        from .lora import LoraMode

        return LoraMode()
    raise ConfigError("mode", name, "this mode is not available yet")


__all__ = ["Mode", "PassInfo", "PassSpec", "StepContext", "get_mode"]
