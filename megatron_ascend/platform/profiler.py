"""Step profiler: --profile records iterations [--profile-step-start, --profile-step-end) on the ranks of
--profile-ranks with the back end's profiler -- ``torch_npu.profiler`` on an NPU (CPU + NPU activities; open the
trace with MindStudio Insight, ascend_npu.md §7.4), ``torch.profiler`` on CUDA (CPU + CUDA) and CPU -- writing
TensorBoard traces under --profile-save-path (default: --tensorboard-dir, else ./profile).

The trainer calls ``before(iteration)`` before a step and ``after(iteration)`` after it (iterations counted from
1); ``close()`` stops a recording that the run's end interrupted. Off (the default) every call is a no-op.
"""
from __future__ import annotations

import os
from typing import Optional

from .runtime import ProfileOptions


class StepProfiler:
    def __init__(self, options: ProfileOptions, rank: int, kind: str):
        self.options = options
        self.active = bool(options.enabled) and rank in options.ranks
        self.kind = kind
        self.path = options.save_path or "profile"
        self._prof = None
        self.recorded = []  # iterations recorded (tests)

    def _make(self):
        os.makedirs(self.path, exist_ok=True)
        from .device import backend_module
        mod = backend_module(self.kind)
        if mod is not None:
            return mod.profiler(self.path)
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        return profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                       on_trace_ready=tensorboard_trace_handler(self.path))

    def before(self, iteration: int) -> None:
        if self.active and self._prof is None and iteration == self.options.step_start:
            self._prof = self._make()
            self._prof.start()

    def after(self, iteration: int) -> None:
        if self._prof is None:
            return
        self.recorded.append(iteration)
        if iteration + 1 >= self.options.step_end:
            self.close()

    def close(self) -> None:
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()


def step_profiler(options: Optional[ProfileOptions], rank: int) -> StepProfiler:
    from .device import get_platform
    return StepProfiler(options or ProfileOptions(), rank, get_platform().kind)
