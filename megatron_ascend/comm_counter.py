"""Count torch.distributed collectives: calls and payload bytes per (group name, kind).

    from megatron_ascend.comm_counter import CommCounter
    with CommCounter(groups) as cc:          # groups: a parallel_state.ProcessGroups (or None)
        run_one_step()
    cc.bytes[("tp", "all_reduce")], cc.calls[("ep", "all_to_all")], cc.table()

Opt-in and free when off: the functions of the ``torch.distributed`` module (all_reduce, all_gather,
all_gather_into_tensor / all_gather_single, reduce_scatter / reduce_scatter_tensor / reduce_scatter_single,
all_to_all_single, all_to_all, broadcast, send / recv / isend / irecv, batch_isend_irecv) are replaced by
counting wrappers only inside the ``with`` block and restored on exit. Code that calls them through the module
(``dist.all_reduce(...)``) is counted; a reference taken at import time (``_AR = dist.all_reduce``) bypasses the
wrapper; to count those too, the counter also wraps, inside the block only, module-level aliases of these
functions in already-imported modules whose name starts with ``alias_prefix`` (default "megatron_ascend."),
found by identity (``mod._ALL_GATHER is dist.all_gather_single``). Prefer calling through the module.

Payload convention (the planner's comm.py uses the same): all_reduce / broadcast / send / recv = the tensor;
all_gather = the gathered output; reduce_scatter = the input; all_to_all = the input this rank sends.
Group names come from ``groups.groups`` (name -> handle); a handle used under several names is reported with
the names joined by "|" (e.g. "dp|tp_dp_cp" when they are the same ranks and the same handle); the default
group is "world" unless a named group is the world handle.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

Key = Tuple[str, str]

# torch.distributed attribute -> (kind, how to measure its payload from (args, kwargs))
def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _arg(args, kwargs, i, name):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else None


def _list_bytes(ts) -> int:
    return sum(_nbytes(t) for t in ts) if isinstance(ts, (list, tuple)) else _nbytes(ts)


_SPECS: Dict[str, Tuple[str, Callable, Optional[str]]] = {
    # name: (kind, payload(args, kwargs), name of the group kwarg)
    "all_reduce": ("all_reduce", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
    "broadcast": ("broadcast", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
    "all_gather": ("all_gather", lambda a, k: _list_bytes(_arg(a, k, 0, "tensor_list")), "group"),
    "all_gather_into_tensor": ("all_gather", lambda a, k: _nbytes(_arg(a, k, 0, "output_tensor")), "group"),
    "all_gather_single": ("all_gather", lambda a, k: _nbytes(_arg(a, k, 0, "output_tensor")), "group"),
    "reduce_scatter": ("reduce_scatter", lambda a, k: _list_bytes(_arg(a, k, 1, "input_list")), "group"),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: _nbytes(_arg(a, k, 1, "input")), "group"),
    "reduce_scatter_single": ("reduce_scatter", lambda a, k: _nbytes(_arg(a, k, 1, "input")), "group"),
    "all_to_all_single": ("all_to_all", lambda a, k: _nbytes(_arg(a, k, 1, "input")), "group"),
    "all_to_all": ("all_to_all", lambda a, k: _list_bytes(_arg(a, k, 1, "input_tensor_list")), "group"),
    "send": ("send", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
    "isend": ("send", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
    "recv": ("recv", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
    "irecv": ("recv", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")), "group"),
}
_GROUP_POS = {"all_reduce": 2, "broadcast": 2, "all_gather": 2, "all_gather_into_tensor": 2,
              "all_gather_single": 2, "reduce_scatter": 3, "reduce_scatter_tensor": 3, "reduce_scatter_single": 3,
              "all_to_all_single": 4, "all_to_all": 2, "send": 2, "isend": 2, "recv": 2, "irecv": 2}


class CommCounter:
    """Context manager that counts collectives issued through ``torch.distributed`` while it is active."""

    def __init__(self, groups=None, names: Optional[Dict[str, object]] = None,
                 alias_prefix: Optional[str] = "megatron_ascend."):
        self.alias_prefix = alias_prefix
        self.aliases: List[Tuple[str, str]] = []  # (module, attribute) wrapped because it held a dist function
        self._alias_saved: List[Tuple[object, str, Callable]] = []
        self.calls: Dict[Key, int] = defaultdict(int)
        self.bytes: Dict[Key, int] = defaultdict(int)
        self._names: Dict[int, str] = {}
        handles = dict(names or {})
        if groups is not None:
            handles.update({k: v for k, v in groups.groups.items() if v is not None})
        for name, h in handles.items():
            key = id(h)
            self._names[key] = name if key not in self._names else self._names[key] + "|" + name
        self._saved: Dict[str, Callable] = {}
        self._busy = False  # a wrapped function that calls another wrapped one is counted once

    # -- naming --------------------------------------------------------------------------------------
    def group_name(self, group) -> str:
        if group is None:
            group = dist.group.WORLD
        name = self._names.get(id(group))
        if name is not None:
            return name
        if group is dist.group.WORLD or group is None:
            return "world"
        return f"group{id(group) & 0xffff:04x}"

    # -- recording -----------------------------------------------------------------------------------
    def record(self, group, kind: str, nbytes: int, calls: int = 1) -> None:
        key = (self.group_name(group), kind)
        self.calls[key] += calls
        self.bytes[key] += nbytes

    def _wrap(self, name: str, fn: Callable) -> Callable:
        kind, payload, gkw = _SPECS[name]
        gpos = _GROUP_POS[name]
        counter = self

        def wrapper(*args, **kwargs):
            if counter._busy:
                return fn(*args, **kwargs)
            group = kwargs.get(gkw, args[gpos] if len(args) > gpos else None)
            counter.record(group, kind, payload(args, kwargs))
            counter._busy = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter._busy = False

        wrapper.__wrapped__ = fn
        wrapper.__name__ = getattr(fn, "__name__", name)
        return wrapper

    def _wrap_batch(self, fn: Callable) -> Callable:
        counter = self

        def batch_isend_irecv(p2p_op_list):
            if not counter._busy:
                for op in p2p_op_list:
                    kind = "send" if op.op is counter._saved.get("isend", dist.isend) else "recv"
                    counter.record(op.group, kind, _nbytes(op.tensor))
            counter._busy = True
            try:
                return fn(p2p_op_list)
            finally:
                counter._busy = False

        batch_isend_irecv.__wrapped__ = fn
        return batch_isend_irecv

    # -- context -------------------------------------------------------------------------------------
    def __enter__(self) -> "CommCounter":
        originals = {}
        for name in _SPECS:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                wrapped = self._wrap(name, fn)
                originals[id(fn)] = wrapped
                setattr(dist, name, wrapped)
        if self.alias_prefix:
            import sys
            for modname, mod in list(sys.modules.items()):
                if mod is None or not modname.startswith(self.alias_prefix) or modname == __name__:
                    continue
                for attr, val in list(vars(mod).items()):
                    if callable(val) and id(val) in originals and not attr.startswith("__"):
                        self._alias_saved.append((mod, attr, val))
                        self.aliases.append((modname, attr))
                        setattr(mod, attr, originals[id(val)])
        if hasattr(dist, "batch_isend_irecv"):
            self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
            dist.batch_isend_irecv = self._wrap_batch(dist.batch_isend_irecv)
        if hasattr(dist, "P2POp"):
            # torch checks ``op in (isend, irecv)`` against its own functions: hand it the unwrapped one
            orig = dist.P2POp
            self._saved["P2POp"] = orig

            def unwrap(op):
                return getattr(op, "__wrapped__", op)

            class P2POp(orig):
                def __new__(cls, op, *a, **k):
                    return super().__new__(cls, unwrap(op), *a, **k)

                def __init__(self, op, *a, **k):
                    super().__init__(unwrap(op), *a, **k)

            dist.P2POp = P2POp
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        for mod, attr, val in self._alias_saved:
            setattr(mod, attr, val)
        self._alias_saved.clear()

    # -- results -------------------------------------------------------------------------------------
    def by_group(self) -> Dict[str, int]:
        out: Dict[str, int] = defaultdict(int)
        for (g, _), b in self.bytes.items():
            out[g] += b
        return dict(out)

    def table(self) -> str:
        rows = [f"{'group':<14} {'kind':<15} {'calls':>7} {'bytes':>14}"]
        for key in sorted(self.bytes):
            rows.append(f"{key[0]:<14} {key[1]:<15} {self.calls[key]:>7} {self.bytes[key]:>14}")
        return "\n".join(rows)
