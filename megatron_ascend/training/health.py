"""NaN / Inf and loss-spike detection for the training loop (``--check-for-nan-in-loss-and-grad``).

Owns ``NanGuard``. After every step the trainer hands it the reduced losses (the same numbers on every rank)
and the global grad norm (one all-reduce over all ranks, so also the same everywhere): a non-finite value in
either is a NaN event, decided identically on every rank without a collective. (With ``--fp16`` a non-finite
grad norm alone is the loss scaler's overflow, which it handles by skipping the step and lowering the scale;
only a non-finite loss is an event.) The optimizer has already skipped the update of such a step.

On an event (only then), one all-gather tells rank 0, for each rank, whether its own loss sums were
non-finite, the first parameters whose gradient is non-finite there (``optimizer.nonfinite_grad_params``),
and, with ``--nan-trace-modules``, the first module whose forward output was non-finite on that rank in the
step (forward hooks on every module, checked in execution order; they cost a device sync per module, so they
are off by default). Rank 0 prints one report line:

    NaN/Inf at iteration 3: lm loss nan, grad norm nan; non-finite loss on rank 1; non-finite grads on ranks
    0, 1 (rank 1: model.layers.1.mlp.experts.down_proj ...); first non-finite module output: rank 1
    model.layers.1 (policy stop, 1 of 1 in a row)

Policies (``--nan-policy``): ``skip`` counts the step as skipped and continues; ``stop`` (default) continues
for up to ``--nan-max-consecutive`` K - 1 events in a row and at the K-th asks the trainer to save the last
good state (weights, optimizer and schedule of the last successful step: the skipped steps did not change them)
and stop with ``TrainingHalted`` (exit code 3). ``--loss-spike-factor F`` reports (without acting) an
``lm loss`` above F times the mean of the last ``--loss-spike-window`` finite losses.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

import torch
import torch.distributed as dist

EXIT_NAN = 3


class TrainingHalted(RuntimeError):
    """Training stopped on purpose (NaN policy); the message says why and what was saved."""

    exit_code = EXIT_NAN


@dataclass
class NanEvent:
    iteration: int
    losses: Dict[str, float]
    grad_norm: Optional[float]
    loss_ranks: List[int] = field(default_factory=list)
    grad_ranks: List[int] = field(default_factory=list)
    grad_params: Dict[int, List[str]] = field(default_factory=dict)
    first_module: Dict[int, str] = field(default_factory=dict)
    consecutive: int = 0
    action: str = ""

    def describe(self, policy: str, limit: int) -> str:
        vals = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.losses.items()) if not math.isfinite(v))
        gn = "n/a" if self.grad_norm is None else f"{self.grad_norm:.4g}"
        parts = [f"NaN/Inf at iteration {self.iteration}: {vals or 'losses finite'}, grad norm {gn}"]
        if self.loss_ranks:
            parts.append(f"non-finite loss on rank(s) {', '.join(map(str, self.loss_ranks))}")
        if self.grad_ranks:
            first = min(self.grad_params) if self.grad_params else None
            detail = f" (rank {first}: {', '.join(self.grad_params[first])})" if first is not None else ""
            parts.append(f"non-finite grads on rank(s) {', '.join(map(str, self.grad_ranks))}{detail}")
        if self.first_module:
            parts.append("first non-finite module output: " +
                         ", ".join(f"rank {r} {m}" for r, m in sorted(self.first_module.items())))
        tail = f"{self.action}; policy {policy}, {self.consecutive} in a row (limit {limit})" if policy == "stop" \
            else f"{self.action}; policy skip"
        return "; ".join(parts) + f" ({tail})"


class _ModuleTracer:
    """Forward hooks recording, per step, the first module whose output holds a non-finite value."""

    def __init__(self, model_chunks):
        self.first: Optional[str] = None
        self._handles = []
        for chunk in model_chunks:
            model = getattr(chunk, "module", chunk)
            for name, mod in model.named_modules():
                if name:
                    self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            if self.first is not None:
                return None
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outs:
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    self.first = name
                    break
            return None
        return hook

    def reset(self) -> None:
        self.first = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _nonfinite_local_losses(results) -> bool:
    for log in results or []:
        for v in (log.values() if isinstance(log, dict) else [log]):
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return True
    return False


class NanGuard:
    def __init__(self, enabled: bool = True, policy: str = "stop", max_consecutive: int = 1,
                 trace_modules: bool = False, spike_factor: Optional[float] = None, spike_window: int = 50,
                 fp16: bool = False, model_chunks=(), print_fn: Optional[Callable[[str], None]] = None):
        self.enabled, self.policy, self.limit = enabled, policy, max(int(max_consecutive), 1)
        self.fp16 = fp16
        self.spike_factor, self.spike_window = spike_factor, spike_window
        self.print_fn = print_fn or (lambda s: None)
        self.tracer = _ModuleTracer(model_chunks) if (enabled and trace_modules) else None
        self.events: List[NanEvent] = []
        self.spikes: List[Dict[str, Any]] = []
        self.consecutive = 0
        self.skipped = 0
        self._recent: Deque[float] = deque(maxlen=max(int(spike_window), 1))

    def begin_step(self) -> None:
        if self.tracer is not None:
            self.tracer.reset()

    def _is_event(self, losses: Dict[str, float], grad_norm: Optional[float]) -> bool:
        bad_loss = any(not math.isfinite(v) for v in losses.values())
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
        return bad_loss or (bad_grad and not self.fp16)

    def _diagnose(self, iteration, losses, grad_norm, results, optimizer) -> NanEvent:
        local = {"loss": _nonfinite_local_losses(results),
                 "params": list(getattr(optimizer, "nonfinite_grad_params", lambda limit=3: [])(limit=3)),
                 "module": self.tracer.first if self.tracer is not None else None}
        if dist.is_available() and dist.is_initialized():
            gathered: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        ev = NanEvent(iteration, dict(losses), grad_norm)
        for r, g in enumerate(gathered):
            if g["loss"]:
                ev.loss_ranks.append(r)
            if g["params"]:
                ev.grad_ranks.append(r)
                ev.grad_params[r] = g["params"]
            if g["module"]:
                ev.first_module[r] = g["module"]
        return ev

    def after_step(self, iteration: int, losses: Dict[str, float], grad_norm: Optional[float], results=None,
                   optimizer=None) -> str:
        """Returns "ok", "skip" (a NaN event the policy tolerates) or "stop" (save the last good state, halt)."""
        if not self.enabled:
            return "ok"
        if not self._is_event(losses, grad_norm):
            self.consecutive = 0
            self._check_spike(iteration, losses)
            return "ok"
        self.consecutive += 1
        self.skipped += 1
        ev = self._diagnose(iteration, losses, grad_norm, results, optimizer)
        ev.consecutive = self.consecutive
        stop = self.policy == "stop" and self.consecutive >= self.limit
        ev.action = "stopping: saving the last good state" if stop else "update skipped"
        self.events.append(ev)
        self.print_fn("WARNING: " + ev.describe(self.policy, self.limit))
        return "stop" if stop else "skip"

    def _check_spike(self, iteration: int, losses: Dict[str, float]) -> None:
        v = losses.get("lm loss")
        if v is None:
            return
        if self.spike_factor and len(self._recent) >= min(5, self._recent.maxlen):
            mean = sum(self._recent) / len(self._recent)
            if mean > 0 and v > self.spike_factor * mean:
                self.spikes.append({"iteration": iteration, "loss": v, "mean": mean})
                self.print_fn(f"WARNING: loss spike at iteration {iteration}: lm loss {v:.4g} is "
                              f"{v / mean:.2f}x the mean {mean:.4g} of the last {len(self._recent)} iterations "
                              f"(--loss-spike-factor {self.spike_factor})")
        self._recent.append(v)

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.remove()
