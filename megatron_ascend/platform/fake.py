"""Fake accelerator: CPU compute that refuses, in collectives, what NCCL / HCCL refuse -- so the defect class
"host tensor handed to a collective" (and "float64 / bool reduction on HCCL") is caught on a CPU machine.

On a real accelerator the world group is NCCL or HCCL and every collective takes device tensors only: an
all-reduce of ``torch.tensor([1.0])`` (a host tensor) fails with ``No backend type associated with device type
cpu``. gloo on CPU takes anything, so a CPU test suite cannot see such a call. In fake mode:

* ``platform.get_platform()`` is ``Platform("fake", "fake-hccl" | "fake-nccl")``; its ``device()`` is
  ``torch.device("cpu", local_rank)`` -- still the CPU (tensors compute there), but spelled with an index, so
  "on the device" and "on the host" are told apart;
* a torch-function mode tags every tensor it sees created as *host* or *device*, as a real accelerator would
  place it: a factory call (``torch.tensor``, ``zeros``, ``arange``, ``from_numpy`` ...) without ``device=``
  or with a plain ``"cpu"`` makes a host tensor, ``device=platform device`` a device tensor; ``.to(device)`` /
  ``.cpu()`` move (copy) between the two; every other op gives a device result when any input is on the device.
  ``tensor.device`` reports ``cpu`` for host tensors and the fake device otherwise. Tensors made where the mode
  cannot see them (inside autograd's backward, in C++ loaders) count as device tensors: the checker can miss
  a defect there, it never invents one;
* the collectives of ``torch.distributed`` (all_reduce, reduce, broadcast, all_gather(_into_tensor / _single),
  reduce_scatter(_tensor / _single), all_to_all(_single), gather, scatter, send, recv, batch_isend_irecv) are
  wrapped: a host tensor raises ``HostTensorInCollective`` (the c10d message, plus where to look), and with the
  HCCL rules a reduction of float64 / bool / unsigned tensors raises ``UnsupportedCollectiveDtype`` (HCCL's
  ``CheckDataType`` refuses them for every reducing collective; NCCL reduces them). Groups created with
  ``new_group(backend="gloo")`` are host groups (the checkpoint writer's) and take host tensors. Object
  collectives (all_gather_object, broadcast_object_list, ...) and barrier are left alone: torch moves their
  buffers to the right device itself.

Use ``with fake_accelerator("hccl"): ...`` around a test body on gloo ranks (tests/test_fake_accelerator.py runs
a whole training run so), or set ``MEGATRON_ASCEND_DEVICE=fake`` (HCCL rules) / ``fake-nccl`` before
``platform.init_distributed`` to run any entry point under the checker on CPU.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Dict, Iterator, List, Optional, Set

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_HOST = "_ma_host"
_CPU = torch.device("cpu")
_DEVICE_DESC = torch._C.TensorBase.__dict__["device"]
_DATA_DESC = torch._C.TensorBase.__dict__["data"]
_GETSET = type(_DEVICE_DESC)

# dtypes HCCL refuses in a reducing collective (HcclCommunicator::CheckDataType with needReduce: UINT8 -- which
# torch_npu maps torch.bool and torch.uint8 to --, UINT16, UINT32, UINT64 and FP64; the HcclAllReduce page lists
# int8, int16, int32, int64, fp16, fp32, bf16 for Atlas A2). NCCL reduces all of these.
HCCL_NO_REDUCE = (torch.float64, torch.bool, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
RULES: Dict[str, tuple] = {"hccl": HCCL_NO_REDUCE, "nccl": ()}

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "all_to_all",
               "gather", "scatter", "send", "recv")
REDUCING = frozenset({"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"})


class HostTensorInCollective(RuntimeError):
    """A host (CPU) tensor was handed to a collective of an accelerator process group."""


class UnsupportedCollectiveDtype(RuntimeError):
    """A reducing collective got a dtype the emulated backend (HCCL) does not reduce."""


class DeviceMismatch(RuntimeError):
    """One op mixed host and device tensors (a real accelerator raises 'Expected all tensors to be on the same
    device')."""


def is_host(t) -> bool:
    """Whether the fake accelerator tagged ``t`` as a host tensor."""
    return isinstance(t, torch.Tensor) and t.__dict__.get(_HOST, False) is True


def _tag(t, host: bool) -> None:
    if isinstance(t, torch.Tensor):
        if host:
            t.__dict__[_HOST] = True
        elif _HOST in t.__dict__:
            del t.__dict__[_HOST]
    elif isinstance(t, (tuple, list)):
        for x in t:
            _tag(x, host)


def _tensors(args, kwargs) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(args)
    walk(kwargs)
    return out


def _as_device(d) -> Optional[torch.device]:
    if isinstance(d, torch.device):
        return d
    if isinstance(d, str):
        try:
            return torch.device(d)
        except RuntimeError:
            return None
    if isinstance(d, int) and not isinstance(d, bool):
        return torch.device("cpu", d)  # an accelerator index
    return None


def _host_device(d: torch.device) -> bool:
    """A plain ``cpu`` (no index) is the host; the fake device is ``cpu:<local rank>``."""
    return d.type == "cpu" and d.index is None


# ops that write into their first argument (or ``out=``): the result keeps that tensor's placement
_KEEP = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                   "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "set_"})
# ops whose inputs may legitimately live on both sides (indexing with host indices, explicit copies)
_MIXING_OK = frozenset({"__getitem__", "__setitem__", "to", "copy_", "cpu", "cuda", "npu", "tensor", "as_tensor",
                        "__repr__", "__format__", "__str__", "__bool__", "__len__", "__iter__", "__contains__",
                        "__reduce_ex__", "__deepcopy__", "item", "tolist", "numpy", "equal"})


class _PlacementMode(TorchFunctionMode):
    """Tags results host / device as an accelerator would place them (see the module docstring)."""

    def __init__(self, device: torch.device, check_mixing: bool = True, report: Optional[Callable] = None):
        super().__init__()
        self.device = device
        self.check_mixing = check_mixing
        self.report = report  # record instead of raise (FakeAccelerator(record_only=True))

    def _to_target(self, name, args, kwargs) -> Optional[bool]:
        """host (True) / device (False) / None (no device named: the result stays where the input is)."""
        if name == "cpu":
            return True
        if name in ("cuda", "npu"):
            return False
        if name == "to":
            cands = [kwargs.get("device")] + list(args[1:2])
            for c in cands:
                if isinstance(c, torch.Tensor):
                    return is_host(c)
                d = _as_device(c)
                if d is not None:
                    return _host_device(d)
            return None
        d = kwargs.get("device")
        if d is not None:
            d = _as_device(d)
            if d is not None:
                return _host_device(d)
        if name in ("tensor", "from_numpy", "frombuffer", "pin_memory"):
            return True
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        desc = getattr(func, "__self__", None)
        if type(desc) is _GETSET:
            if desc is _DEVICE_DESC:
                return _CPU if is_host(args[0]) else self.device
            out = func(*args, **kwargs)
            if desc is _DATA_DESC:
                if func.__name__ == "__set__":
                    _tag(args[0], is_host(args[1]))
                else:
                    _tag(out, is_host(args[0]))
            return out
        name = getattr(func, "__name__", "")
        if name in _KEEP or "out" in kwargs or (name.endswith("_") and not name.endswith("__")):
            return func(*args, **kwargs)
        target = self._to_target(name, args, kwargs)
        if target is None:
            ts = _tensors(args, kwargs)
            if not ts:
                target = True  # a factory without device=: the host
            else:
                hosts = [is_host(t) for t in ts]
                target = all(hosts)
                if self.check_mixing and not target and any(hosts) and name not in _MIXING_OK:
                    bad = next(t for t, h in zip(ts, hosts) if h and t.dim() > 0) if any(
                        h and t.dim() > 0 for t, h in zip(ts, hosts)) else None
                    if bad is not None:
                        err = DeviceMismatch(
                            f"Expected all tensors to be on the same device, but found at least two devices, cpu "
                            f"and {self.device} (fake accelerator): {name} got a host tensor {tuple(bad.shape)} "
                            f"{bad.dtype} next to device tensors; create it on platform.get_platform().device()")
                        if self.report is None:
                            raise err
                        self.report(err)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and len(args) and out is args[0] and is_host(out) != target \
                and name in ("to", "cpu", "cuda", "npu"):
            out = out.clone()  # a real move copies; the source keeps its placement
        _tag(out, target)
        return out


def _group_of(fn: Callable, args, kwargs):
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("group")


class FakeAccelerator:
    """Install / uninstall the fake accelerator in this process (see the module docstring)."""

    def __init__(self, backend: str = "hccl", local_rank: Optional[int] = None, check_mixing: bool = True,
                 record_only: bool = False):
        if backend not in RULES:
            raise ValueError(f"fake accelerator backend {backend!r} is unknown; use one of {sorted(RULES)}")
        self.backend = backend
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu", local_rank)
        self.no_reduce = RULES[backend]
        self.host_groups: Set[int] = set()
        self.calls: Dict[str, int] = {}
        self.record_only = record_only  # collect every violation in .violations instead of raising the first
        self.violations: List[str] = []
        self._saved: Dict[str, Callable] = {}
        self._mode = _PlacementMode(self.device, check_mixing, self._record if record_only else None)
        self._platform = None
        self.installed = False

    # -- checks ---------------------------------------------------------------------------------------------
    def check(self, name: str, fn: Callable, args, kwargs) -> None:
        try:
            self._check(name, fn, args, kwargs)
        except (HostTensorInCollective, UnsupportedCollectiveDtype) as e:
            if not self.record_only:
                raise
            self._record(e)

    def _record(self, err: Exception) -> None:
        import traceback
        where = "".join(traceback.format_stack(limit=7)[:-3])
        self.violations.append(f"{type(err).__name__}: {err}\n{where}")

    def _check(self, name: str, fn: Callable, args, kwargs) -> None:
        group = _group_of(fn, args, kwargs)
        self.calls[name] = self.calls.get(name, 0) + 1
        if group is not None and id(group) in self.host_groups:
            return
        for t in _tensors(args, kwargs):
            if is_host(t):
                raise HostTensorInCollective(
                    f"No backend type associated with device type cpu: dist.{name} on a {self.backend} group got "
                    f"a host (CPU) tensor {tuple(t.shape)} {t.dtype} (fake {self.backend} mode, "
                    f"megatron_ascend/platform/fake.py). NCCL / HCCL take device tensors only: create it on "
                    f"platform.get_platform().device() (or use a gloo group made with new_group(backend='gloo'))")
            if name in REDUCING and t.dtype in self.no_reduce:
                raise UnsupportedCollectiveDtype(
                    f"dist.{name} of a {t.dtype} tensor {tuple(t.shape)}: {self.backend.upper()} does not reduce "
                    f"{', '.join(str(d).replace('torch.', '') for d in self.no_reduce)} (HCCL CheckDataType; "
                    f"HcclAllReduce takes int8/16/32/64, fp16, fp32, bf16); reduce int64 for exact counts or fp32")
            if name == "all_to_all_single" and self.backend == "hccl" and t.dim() == 0:
                raise UnsupportedCollectiveDtype(f"dist.all_to_all_single of a 0-dim tensor: HCCL rejects it")

    def _wrap(self, name: str, fn: Callable) -> Callable:
        acc = self

        def wrapper(*args, **kwargs):
            acc.check(name, fn, args, kwargs)
            return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        wrapper.__name__ = name
        return wrapper

    def _wrap_batch(self, fn: Callable) -> Callable:
        acc = self

        def batch_isend_irecv(p2p_op_list):
            for op in p2p_op_list:
                acc.check("batch_isend_irecv", lambda tensor, group=None: None, (op.tensor,), {"group": op.group})
            return fn(p2p_op_list)

        batch_isend_irecv.__wrapped__ = fn
        return batch_isend_irecv

    def _wrap_new_group(self, fn: Callable) -> Callable:
        acc = self

        def new_group(*args, **kwargs):
            g = fn(*args, **kwargs)
            try:
                backend = inspect.signature(fn).bind(*args, **kwargs).arguments.get("backend")
            except TypeError:
                backend = None
            if backend is not None and str(backend).lower() in ("gloo", "cpu:gloo") and g is not None:
                acc.host_groups.add(id(g))
            return g

        new_group.__wrapped__ = fn
        return new_group

    # -- install ----------------------------------------------------------------------------------------------
    def install(self) -> "FakeAccelerator":
        if self.installed:
            return self
        from . import device as _device
        self._platform = _device.set_platform(_device.Platform("fake", f"fake-{self.backend}"))
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        self._saved["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._wrap_batch(dist.batch_isend_irecv)
        self._saved["new_group"] = dist.new_group
        dist.new_group = self._wrap_new_group(dist.new_group)
        self._mode.__enter__()
        self.installed = True
        return self

    def uninstall(self) -> None:
        if not self.installed:
            return
        self._mode.__exit__(None, None, None)
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        from . import device as _device
        _device.set_platform(self._platform)
        self.installed = False


@contextlib.contextmanager
def fake_accelerator(backend: str = "hccl", local_rank: Optional[int] = None, check_mixing: bool = True,
                     record_only: bool = False) -> Iterator[FakeAccelerator]:
    """Run the body on a fake ``backend`` accelerator (``hccl`` or ``nccl`` rules) on CPU."""
    acc = FakeAccelerator(backend, local_rank, check_mixing, record_only).install()
    try:
        yield acc
    finally:
        acc.uninstall()
