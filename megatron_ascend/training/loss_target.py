"""``--exit-at-loss L``: stop a run once its training loss has reached a target (the reference recipes'
"train to loss L" rule, bench/reference/).

The test is on the mean ``lm loss`` of the last ``--exit-at-loss-window`` iterations (default 10; non-finite
values are skipped), so one lucky batch does not end a run; the decision is all-reduced (MAX) over the world so
every rank leaves at the same iteration, and the trainer exits as it does for --exit-interval (checkpoint
saved when --save is set). ``reached`` is only collective when the flag is set.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError


class LossTarget:
    def __init__(self, target: Optional[float], window: int = 10):
        if target is not None and not math.isfinite(target):
            raise ConfigError(f"--exit-at-loss {target} is not a finite number; give the loss to stop at, e.g. 3.0")
        if window < 1:
            raise ConfigError(f"--exit-at-loss-window {window} must be >= 1 (iterations averaged)")
        self.target = target
        self.window = int(window)
        self._recent = deque(maxlen=self.window)

    @classmethod
    def from_args(cls, args) -> "LossTarget":
        return cls(getattr(args, "exit_at_loss", None), getattr(args, "exit_at_loss_window", None) or 10)

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def update(self, loss: Optional[float]) -> None:
        if self.enabled and loss is not None and math.isfinite(loss):
            self._recent.append(float(loss))

    def mean(self) -> Optional[float]:
        return sum(self._recent) / len(self._recent) if len(self._recent) == self.window else None

    def reached(self, device: torch.device) -> bool:
        """Every rank calls this at the same iteration (collective when enabled)."""
        if not self.enabled:
            return False
        m = self.mean()
        flag = torch.tensor([1.0 if (m is not None and m <= self.target) else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def reason(self) -> str:
        m = self.mean()
        return (f"exit-at-loss {self.target:g} (mean lm loss of the last {self.window} iterations "
                f"{'n/a' if m is None else f'{m:.4f}'})")
