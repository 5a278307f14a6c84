"""Fault injection for reliability tests: kill a rank, poison a layer's output, or stall a rank, at a given
iteration, from an environment variable (off unless it is set; the tests and bench/fault_injection.py use it,
as Megatron's --error-injection-* and NVRx's fault injectors serve theirs).

    MEGATRON_ASCEND_FAULT="kind=kill,iter=5,rank=1;kind=nan,iter=3,layer=1,rank=0"

One fault per ``;``-separated entry, ``key=value`` pairs separated by ``,``:

* ``kind``: ``kill`` (SIGKILL to this process, like ``kill -9``), ``nan`` (the forward output of decoder layer
  ``layer`` becomes NaN), ``hang`` (this rank sleeps ``seconds``, default forever, before the step: the others
  wait in the step's first collective);
* ``iter``: the iteration being computed (1-based, as logged); ``rank``: global rank (default 0);
* ``stage`` (kill only): ``step`` (default: at the start of the step), ``forward`` (inside the first
  micro-batch's forward), or a checkpoint-commit stage while saving that iteration: ``after_write`` (this rank
  wrote its files), ``before_rename`` / ``before_tracker`` (rank 0, common.json written);
* ``restart``: the torchrun restart count (TORCHELASTIC_RESTART_COUNT) the fault applies to (default 0, so a
  restarted job runs clean; ``any`` for every attempt).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional

ENV = "MEGATRON_ASCEND_FAULT"
_KINDS = ("kill", "nan", "hang")
_STAGES = ("step", "forward", "after_write", "before_rename", "before_tracker")


@dataclass
class Fault:
    kind: str
    iteration: int
    rank: int = 0
    stage: str = "step"
    layer: Optional[int] = None
    seconds: float = 1e9
    restart: Optional[int] = 0


def parse(spec: str) -> List[Fault]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kv = dict(p.split("=", 1) for p in entry.split(",") if "=" in p)
        kind = kv.get("kind")
        if kind not in _KINDS or "iter" not in kv:
            raise ValueError(f"{ENV} entry {entry!r}: needs kind=kill|nan|hang and iter=N")
        stage = kv.get("stage", "step")
        if stage not in _STAGES:
            raise ValueError(f"{ENV} entry {entry!r}: stage {stage!r} is not one of {', '.join(_STAGES)}")
        if kind == "nan" and "layer" not in kv:
            raise ValueError(f"{ENV} entry {entry!r}: kind=nan needs layer=L")
        restart = kv.get("restart", "0")
        out.append(Fault(kind, int(kv["iter"]), int(kv.get("rank", 0)), stage,
                         int(kv["layer"]) if "layer" in kv else None, float(kv.get("seconds", 1e9)),
                         None if restart == "any" else int(restart)))
    return out


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    """Holds this rank's faults; the trainer calls ``step(iteration)`` before each step and ``attach(model_chunks)``
    once. Inactive (and free) without the environment variable."""

    def __init__(self, rank: int, spec: Optional[str] = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.faults = [f for f in parse(spec) if f.rank == rank and (f.restart is None or f.restart == restart)]
        self.iteration = 0
        self._forward_armed = False

    @property
    def active(self) -> bool:
        return bool(self.faults)

    def attach(self, model_chunks) -> None:
        """Forward hooks: NaN output of a decoder layer, kill inside a forward. Registered before any other
        hook so that detectors (training/health.py) see the poisoned output."""
        if not self.active:
            return
        for chunk in model_chunks:
            model = getattr(chunk, "module", chunk)
            for name, mod in model.named_modules():
                for f in self.faults:
                    if f.kind == "nan" and name.endswith(f"layers.{f.layer}") and name.count(".") <= 2 \
                            and not name.startswith("mtp"):
                        mod.register_forward_hook(self._nan_hook(f))
            model.register_forward_pre_hook(self._forward_hook)

    def _nan_hook(self, f: Fault):
        def hook(module, args, output):
            if self.iteration != f.iteration:
                return None
            if isinstance(output, tuple):
                return (output[0] * float("nan"),) + tuple(output[1:])
            return output * float("nan")
        return hook

    def _forward_hook(self, module, args):
        if self._forward_armed:
            _kill_self()

    def step(self, iteration: int) -> None:
        """Called before computing ``iteration`` (1-based)."""
        self.iteration = iteration
        for f in self.faults:
            if f.iteration != iteration:
                continue
            if f.kind == "kill" and f.stage == "step":
                _kill_self()
            elif f.kind == "kill" and f.stage == "forward":
                self._forward_armed = True
            elif f.kind == "hang":
                time.sleep(f.seconds)

    def checkpoint_stage(self, stage: str) -> None:
        """Installed as checkpoint.py's fault hook while this injector is active."""
        for f in self.faults:
            if f.kind == "kill" and f.stage == stage and f.iteration == self.iteration:
                _kill_self()

    def install_checkpoint_hook(self) -> None:
        if any(f.kind == "kill" and f.stage in ("after_write", "before_rename", "before_tracker")
               for f in self.faults):
            from ..checkpointing import checkpoint
            checkpoint._FAULT_HOOK = self.checkpoint_stage
            self._installed = True

    def uninstall(self) -> None:
        if getattr(self, "_installed", False):
            from ..checkpointing import checkpoint
            checkpoint._FAULT_HOOK = None
            self._installed = False
