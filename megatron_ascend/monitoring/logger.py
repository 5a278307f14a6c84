"""The training log line (Megatron's format) and the per-iteration TensorBoard scalars.

``TrainingLogger.record_iteration(...)`` is called once per iteration on every rank with values that are already
reduced (the caller all-reduces losses over dp and broadcasts them from the last pipeline stage); it writes the
per-iteration scalars (``lm loss``, ``mtp_1 loss``, ``load_balancing_loss``, ``learning-rate``, ``grad-norm``,
``num-zeros``, ``loss-scale``, ``batch-size``, each also "vs samples") and, every ``log_interval`` iterations,
prints one line with averages since the last line and writes ``iteration-time``, ``throughput`` (TFLOP/s per
device), ``tokens-per-sec``, ``mfu`` and the ``mem-*-bytes`` scalars. ``record_validation`` writes
``lm loss validation`` and ``lm loss validation ppl`` (and the same for the other losses).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Dict, Optional

from .memory import format_memory, memory_scalars
from .tensorboard import TensorBoardWriter
from .throughput import Throughput


def _fmt_float(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.6E}"


class TrainingLogger:
    def __init__(self, writer: TensorBoardWriter, train_iters: int, log_interval: int, throughput: Throughput,
                 print_fn: Optional[Callable[[str], None]] = print):
        self.writer = writer
        self.train_iters = train_iters
        self.log_interval = max(1, int(log_interval))
        self.throughput = throughput
        self.print_fn = print_fn
        self.last_lines = []  # every printed line (tests and the run report read them)
        self._reset()
        self.total_skipped = 0
        self.total_nan = 0

    def _reset(self):
        self._sums = defaultdict(float)
        self._count = 0
        self._skipped = 0
        self._nan = 0
        self._tokens = 0.0
        self._seconds = 0.0
        self._grad_norm_sum = 0.0
        self._grad_norm_n = 0

    def _emit(self, line: str):
        self.last_lines.append(line)
        if self.print_fn is not None:
            self.print_fn(line)

    def record_iteration(self, iteration: int, consumed_samples: int, losses: Dict[str, float], lr: float,
                         global_batch_size: int, grad_norm: Optional[float], skipped: bool, tokens: float,
                         seconds: float, num_zeros: Optional[float] = None, loss_scale: Optional[float] = None,
                         extra_scalars: Optional[Dict[str, float]] = None) -> Optional[str]:
        w, s = self.writer, consumed_samples
        nan = any(v is not None and not math.isfinite(v) for v in losses.values())
        w.scalar("learning-rate", lr, iteration, s)
        w.scalar("batch-size", global_batch_size, iteration, s)
        for name, v in losses.items():
            w.scalar(name, v, iteration, s)
        if grad_norm is not None and not skipped:
            w.scalar("grad-norm", grad_norm, iteration, s)
        if num_zeros is not None:
            w.scalar("num-zeros", num_zeros, iteration, s)
        if loss_scale is not None:
            w.scalar("loss-scale", loss_scale, iteration, s)
        if extra_scalars:
            w.scalars(extra_scalars, iteration, s)
        self._count += 1
        self._tokens += tokens
        self._seconds += seconds
        if skipped:
            self._skipped += 1
            self.total_skipped += 1
        if nan:
            self._nan += 1
            self.total_nan += 1
        if not skipped and not nan:
            for name, v in losses.items():
                self._sums[name] += v
            if grad_norm is not None:
                self._grad_norm_sum += grad_norm
                self._grad_norm_n += 1
        if iteration % self.log_interval != 0 and iteration != self.train_iters:
            return None
        tp = self.throughput.compute(self._tokens, self._seconds)
        ms = 1000.0 * self._seconds / max(self._count, 1)
        mem = memory_scalars()
        w.scalar("iteration-time", ms / 1000.0, iteration, s)
        w.scalar("throughput", tp["tflops_per_device"], iteration, s)
        w.scalar("tokens-per-sec", tp["tokens_per_sec"], iteration, s)
        if tp["mfu"] is not None:
            w.scalar("mfu", tp["mfu"], iteration, s)
        w.scalars(mem, iteration, s)
        good = max(self._count - max(self._skipped, self._nan), 1)
        parts = [f" iteration {iteration:8d}/{self.train_iters:8d}", f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {ms:.1f}",
                 f"throughput per device (TFLOP/s/device): {tp['tflops_per_device']:.4g}",
                 f"tokens/s: {tp['tokens_per_sec']:.1f}",
                 "MFU: " + ("n/a" if tp["mfu"] is None else f"{100 * tp['mfu']:.2f}%"),
                 f"learning rate: {lr:.6E}", f"global batch size: {global_batch_size:5d}"]
        for name in sorted(self._sums, key=lambda n: (n != "lm loss", n)):
            parts.append(f"{name}: {_fmt_float(self._sums[name] / good)}")
        if loss_scale is not None:
            parts.append(f"loss scale: {loss_scale:.1f}")
        if self._grad_norm_n:
            parts.append(f"grad norm: {self._grad_norm_sum / self._grad_norm_n:.3f}")
        if num_zeros is not None:
            parts.append(f"num zeros: {num_zeros:.1f}")
        parts += [f"number of skipped iterations: {self._skipped:3d}", f"number of nan iterations: {self._nan:3d}",
                  format_memory(mem)]
        line = " | ".join(parts) + " |"
        self._emit(line)
        w.flush()
        self._reset()
        return line

    def record_validation(self, iteration: int, consumed_samples: int, losses: Dict[str, float],
                          label: str = "validation") -> str:
        parts = []
        for name, v in losses.items():
            ppl = math.exp(min(20.0, v)) if math.isfinite(v) else float("nan")
            self.writer.scalar(f"{name} {label}", v, iteration, consumed_samples)
            self.writer.scalar(f"{name} {label} ppl", ppl, iteration, consumed_samples)
            parts.append(f"{name} value: {v:.6E} | {name} PPL: {ppl:.6E}")
        line = f" {label} loss at iteration {iteration} | " + " | ".join(parts) + " |"
        bar = "-" * len(line)
        self._emit(bar)
        self._emit(line)
        self._emit(bar)
        self.writer.flush()
        return line


class Timer:
    """Wall-clock seconds between start() and stop() (the caller synchronises the device first)."""

    def __init__(self):
        self._t0 = None

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0
