"""A record of what one rank's schedule did and when: forward / backward of which microbatch and chunk.

    trace = ScheduleTrace()
    forward_backward(..., trace=trace)
    trace.order()   # [('F', 0, 0), ('F', 1, 0), ('B', 0, 0), ...]  (kind, microbatch, chunk)

Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: comparable between processes of one
machine), so the bubble benchmark can line up the ranks. With ``synchronize=True`` the device is synchronised
before each timestamp, so asynchronous kernels are charged to the step that launched them.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Tuple

from ..platform import synchronize as _device_sync


@dataclass(frozen=True)
class TraceEvent:
    kind: str  # "F" forward, "B" backward
    microbatch: int
    chunk: int
    start: float
    end: float


@dataclass
class ScheduleTrace:
    synchronize: bool = False
    rank: int = -1  # pipeline rank, filled in by the schedule
    events: List[TraceEvent] = field(default_factory=list)

    def _now(self) -> float:
        if self.synchronize:
            _device_sync()
        return time.perf_counter()

    @contextmanager
    def step(self, kind: str, microbatch: int, chunk: int):
        t0 = self._now()
        yield
        self.events.append(TraceEvent(kind, microbatch, chunk, t0, self._now()))

    def order(self) -> List[Tuple[str, int, int]]:
        return [(e.kind, e.microbatch, e.chunk) for e in self.events]
