"""An exponential moving average of the trainable network weights (``ema_decay``).

Not to be confused with ``losses.Ema``, which only smooths the logged loss.

After optimizer step t (1-based) every shadow copy s of a parameter p becomes
``s = d_t * s + (1 - d_t) * p`` with the warm-up ``d_t = min(ema_decay, (1 + t) / (10 + t))``:
early steps follow the weights closely (d_1 ≈ 0.18), so the average is not dominated by
the untrained starting point, and the full decay applies once (1 + t) / (10 + t) exceeds it
(after about 9 / (1 - decay) steps). The shadows start as copies of the weights at step 0
(or of the resumed weights) and are kept in fp32 on the parameters' device.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Sequence

import torch


def warmup_decay(decay: float, step: int) -> float:
    """The decay used after optimizer step ``step`` (1-based)."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


class EmaWeights:
    """fp32 shadow copies of ``params``, updated after each optimizer step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.step = 0
        with torch.no_grad():
            self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call once after each optimizer step)."""
        self.step += 1
        keep = warmup_decay(self.decay, self.step)
        for s, p in zip(self.shadow, self.params):
            s.mul_(keep).add_(p.detach().to(torch.float32), alpha=1.0 - keep)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged weights; the raw ones come back after."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for r, p in zip(raw, self.params):
                    p.copy_(r)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadows by position (CPU copies), plus the step for the warm-up."""
        out = {f"shadow.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        out["step"] = torch.tensor(self.step, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadows saved by ``state_dict``; refuses a different set of parameters."""
        keys = {k for k in state if k.startswith("shadow.")}
        if len(keys) != len(self.shadow) or "step" not in state:
            raise ValueError(f"the EMA state holds {len(keys)} tensors, the network has {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            saved = state[f"shadow.{i}"]
            if saved.shape != s.shape:
                raise ValueError(f"EMA tensor {i} has shape {tuple(saved.shape)}, the network's {tuple(s.shape)}")
            s.copy_(saved.to(s.device, torch.float32))
        self.step = int(state["step"])


def applied(ema: EmaWeights | None) -> ContextManager[None]:
    """``ema.applied()``, or a no-op without EMA."""
    return ema.applied() if ema is not None else nullcontext()
