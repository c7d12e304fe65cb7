"""Options for the network's EMA weights and for resuming with the optimizer state."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..params import ConfigError, param


@dataclass
class StateOptions:
    ema_decay: float = param("float", 0.0, "EMA decay", "Keep an exponential moving average of the network weights (updated after each step, with the warm-up min(decay, (1+t)/(10+t))) and save it instead of the raw weights; training itself goes on with the raw weights. 0 turns it off; 0.999 is typical for thousands of steps, lower for short runs.", minimum=0, maximum=0.999999, group="saving")
    save_state: bool = param("bool", False, "Save training state", "Next to each saved file, also save <name>-state/ (raw weights, optimizer and scheduler state, step, random generators, data position, EMA), so network_resume of that file continues exactly where it stopped.", group="saving")

    def check(self) -> None:
        """Checks of these options (called by TrainConfig.validate with the whole config).

        The schema's range applies when settings are read from a form, preset or CLI; a config
        built in code is checked here too, since a decay of 1 would never move the average.
        """
        decay = self.ema_decay
        if not isinstance(decay, (int, float)) or not math.isfinite(decay) or not 0.0 <= decay < 1.0:
            raise ConfigError("ema_decay", decay, "must be 0 (off) or between 0 and 1 (exclusive)")
