"""TensorBoard scalars under the names Megatron users know, each also written against consumed samples.

``TensorBoardWriter(log_dir)`` wraps ``torch.utils.tensorboard.SummaryWriter``. ``scalar(name, value, iteration,
samples)`` writes ``name`` at step = iteration and ``"name vs samples"`` at step = consumed samples (Megatron's
convention). A writer built with ``log_dir=None`` (or ``enabled=False``: every rank but the last, as in Megatron,
because the last pipeline stage holds the loss) accepts the same calls and writes nothing.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional


class TensorBoardWriter:
    def __init__(self, log_dir: Optional[str], enabled: bool = True, queue_size: int = 1000,
                 flush_secs: int = 30):
        self.log_dir = log_dir
        self._writer = None
        if log_dir and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a runtime dependency, say so plainly
                raise ImportError(f"--tensorboard-dir {log_dir!r} needs the tensorboard package ({e}); "
                                  f"pip install tensorboard, or drop --tensorboard-dir") from e
            os.makedirs(log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=log_dir, max_queue=queue_size, flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalar(self, name: str, value, iteration: int, samples: Optional[int] = None) -> None:
        if self._writer is None or value is None:
            return
        value = float(value)
        if math.isinf(value):
            return  # keep plots readable; nan is kept so divergence is visible
        self._writer.add_scalar(name, value, iteration)
        if samples is not None:
            self._writer.add_scalar(f"{name} vs samples", value, samples)

    def scalars(self, values: Dict[str, float], iteration: int, samples: Optional[int] = None) -> None:
        for k, v in values.items():
            self.scalar(k, v, iteration, samples)

    def text(self, tag: str, text: str, iteration: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, iteration)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
