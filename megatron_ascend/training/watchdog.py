"""Heartbeat watchdog: a step that runs past ``--watchdog-timeout-minutes`` is reported and the process exits
with code 4, so torchrun (``--max-restarts``) restarts the group from the last checkpoint.

Owns ``Watchdog``. The trainer calls ``beat(iteration)`` before each step (the limit covers one iteration
with its evaluation and checkpoint save, not the start-up). While it runs, the ``torch.distributed``
functions (all_reduce, all_gather, broadcast, barrier, reduce_scatter, all_to_all, send / recv, the object
collectives ...) are wrapped to record the operation in flight and its group (name from ProcessGroups, and
its global ranks): a dictionary write per call. A daemon thread checks the beat every second or so; when
the current step is over the limit it

1. prints this rank's line: the iteration, how long it has run, the collective it waits in (group, ranks,
   since when) or "not in a collective", and the main thread's innermost frames;
2. publishes that state in the default process group's store and waits a few seconds for the other ranks'
   (their watchdogs fire at about the same time: everyone's step is over the limit);
3. the lowest rank that reported prints which ranks are not waiting in a collective while others are
   ("never joined: rank 1 at iteration 3, not in a collective; main thread at ...") and which did not report at
   all (dead, or stuck outside Python);
4. exits with ``EXIT_HANG`` (``os._exit``: the main thread is blocked and cannot unwind).

The process-group timeout (``--distributed-timeout-minutes``, default 30, applied to every group) remains
the backstop that turns a hang into an error in the communication library itself.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Callable, Dict, Optional

import torch.distributed as dist

EXIT_HANG = 4
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
            "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
            "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "scatter",
            "gather_object", "monitored_barrier")
_KEY = "megatron_ascend_watchdog"


class Watchdog:
    def __init__(self, timeout_s: Optional[float], rank: int = 0, world: int = 1, groups=None,
                 print_fn: Optional[Callable[[str], None]] = None, exit_fn: Callable[[int], None] = os._exit,
                 poll_s: Optional[float] = None, grace_s: Optional[float] = None):
        self.timeout_s = timeout_s
        self.rank, self.world = rank, world
        self.print_fn = print_fn or (lambda s: print(s, file=sys.stderr, flush=True))
        self.exit_fn = exit_fn
        self.poll_s = poll_s if poll_s is not None else min(1.0, (timeout_s or 10.0) / 10)
        self.grace_s = grace_s if grace_s is not None else min(30.0, max(5.0, (timeout_s or 10.0) / 2))
        self._names: Dict[int, str] = {}
        if groups is not None:
            for name, h in getattr(groups, "groups", {}).items():
                if h is not None and id(h) not in self._names:
                    self._names[id(h)] = name
        self._saved: Dict[str, Callable] = {}
        self._op: Optional[tuple] = None  # (name, group description, t0)
        self._last_async: Optional[tuple] = None
        self._beat: Optional[float] = None
        self._iteration = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self.fired = False

    @property
    def enabled(self) -> bool:
        return bool(self.timeout_s) and self.timeout_s > 0

    # -- collective tracking -------------------------------------------------------------------------
    def _group_desc(self, group) -> str:
        try:
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        except Exception:
            ranks = []
        if group is None or group is dist.group.WORLD:
            name = "world"
        else:
            name = self._names.get(id(group), "group")
        shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
        return f"{name} (ranks {shown})"

    def _wrap(self, name: str, fn: Callable) -> Callable:
        is_async = name in ("isend", "irecv", "batch_isend_irecv")

        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            rec = (name, group, time.time())
            if is_async or kwargs.get("async_op"):
                self._last_async = rec
                return fn(*args, **kwargs)
            prev, self._op = self._op, rec
            try:
                return fn(*args, **kwargs)
            finally:
                self._op = prev
        wrapper.__wrapped__ = fn
        return wrapper

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> "Watchdog":
        if not self.enabled or self._thread is not None:
            return self
        for name in _WRAPPED:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ma-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}
        self._beat = None

    def beat(self, iteration: int) -> None:
        """Start of the step computing ``iteration``: its time limit starts now."""
        self._iteration = iteration
        self._beat = time.time()

    def pause(self) -> None:
        self._beat = None

    # -- the check -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            beat = self._beat
            if beat is not None and time.time() - beat > self.timeout_s:
                self._fire(time.time() - beat)
                return

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return "?"
        frames = traceback.extract_stack(frame)
        inner = [f for f in frames if "/torch/" not in f.filename and f.filename != __file__][-3:]
        return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(inner))

    def state(self, elapsed: float) -> Dict[str, object]:
        op, now = self._op, time.time()
        s = {"rank": self.rank, "iteration": self._iteration, "elapsed": round(elapsed, 1), "stack": self._stack()}
        if op is not None:
            s.update(op=op[0], group=self._group_desc(op[1]), waiting=round(now - op[2], 1))
        elif self._last_async is not None and self._beat is not None and self._last_async[2] >= self._beat:
            s.update(last_async=op_desc(self._last_async[0], self._group_desc(self._last_async[1])))
        return s

    def _fire(self, elapsed: float) -> None:
        self.fired = True
        me = self.state(elapsed)
        self.print_fn(f"WATCHDOG rank {self.rank}: iteration {me['iteration']} has run {me['elapsed']} s, over the "
                      f"limit of {self.timeout_s:.1f} s (--watchdog-timeout-minutes); " + describe(me))
        others = self._exchange(me)
        if others is not None and self.rank == min(r for r, st in others.items() if st is not None):
            self.print_fn(f"WATCHDOG rank {self.rank}: " + summarize(others, self.world))  # one summary per job
        self.print_fn(f"WATCHDOG rank {self.rank}: exiting with code {EXIT_HANG} so the launcher (torchrun "
                      f"--max-restarts) can restart the job from its last checkpoint")
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            self.exit_fn(EXIT_HANG)

    def _exchange(self, me: Dict[str, object]) -> Optional[Dict[int, Optional[Dict[str, object]]]]:
        """Publish this rank's state in the default store; collect the others' for up to grace_s seconds."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:
            return None
        try:
            store.set(f"{_KEY}/{self.rank}", json.dumps(me))
        except Exception:
            return None
        out: Dict[int, Optional[Dict[str, object]]] = {r: None for r in range(self.world)}
        out[self.rank] = me
        deadline = time.time() + self.grace_s
        while True:
            for r in range(self.world):
                if out[r] is None:
                    try:
                        if store.check([f"{_KEY}/{r}"]):
                            out[r] = json.loads(store.get(f"{_KEY}/{r}"))
                    except Exception:
                        pass
            if all(v is not None for v in out.values()) or time.time() > deadline:
                time.sleep(1.0)  # let the slower ranks read this rank's state (the store may live in this process)
                return out
            time.sleep(0.1)


def op_desc(op: str, group: str) -> str:
    return f"{op} on group {group}"


def describe(s: Dict[str, object]) -> str:
    if "op" in s:
        where = f"waiting in {op_desc(s['op'], s['group'])} for {s['waiting']} s"
    else:
        where = "not in a collective" + (f" (last async op issued: {s['last_async']})" if s.get("last_async") else "")
    return f"{where}; main thread at {s['stack']}"


def summarize(states: Dict[int, Optional[Dict[str, object]]], world: int) -> str:
    waiting = [r for r, s in states.items() if s is not None and "op" in s]
    outside = [r for r, s in states.items() if s is not None and "op" not in s]
    silent = [r for r, s in states.items() if s is None]
    parts = []
    if waiting:
        parts.append(f"ranks waiting in a collective: {', '.join(map(str, waiting))}")
    if outside and waiting:
        parts.append("never joined (not in any collective while the others wait): " +
                     "; ".join(f"rank {r} at iteration {states[r]['iteration']}, {describe(states[r])}" for r in outside))
    elif outside:
        parts.append("not in a collective: " + ", ".join(map(str, outside)))
    if silent:
        parts.append(f"no report from rank(s) {', '.join(map(str, silent))} (dead, or stuck outside Python)")
    return "; ".join(parts) if parts else f"all {world} ranks reported"
