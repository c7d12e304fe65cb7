"""Options for the network's EMA weights and for resuming with the optimizer state."""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param


@dataclass
class StateOptions:
    ema_decay: float = param("float", 0.0, "EMA decay", "Keep an exponential moving average of the network weights and save it; 0 turns it off (0.999 is typical).", minimum=0, maximum=0.999999)
    save_state: bool = param("bool", False, "Save training state", "Save the optimizer state and step in <name>-state/ next to each saved file, so network_resume continues exactly.")

    def check(self) -> None:
        """Cross-field checks of these options (called by TrainConfig.validate)."""
