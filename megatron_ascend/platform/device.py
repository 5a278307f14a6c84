"""Device, backend and distributed initialisation for npu / cuda / cpu (and the fake accelerator).

Detection order: an Ascend NPU (torch_npu importable and ``torch.npu.device_count() > 0``), then CUDA,
then CPU. ``MEGATRON_ASCEND_DEVICE=cpu|cuda|npu`` forces a choice (the CPU tests set cpu); ``fake`` /
``fake-nccl`` run on CPU under platform/fake.py's collective checks (HCCL / NCCL rules). What differs between
the accelerators (environment, runtime switches, device checks, profiler) lives in npu.py and cuda.py; this file
holds what they share: the Platform record, init_distributed, groups with the job's timeout, memory statistics,
RNG state.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo", "fake": "gloo"}
_FAKE = {"fake": "hccl", "fake-hccl": "hccl", "fake-nccl": "nccl"}  # MEGATRON_ASCEND_DEVICE values (platform/fake.py)


@dataclass(frozen=True)
class Platform:
    kind: str  # "npu" | "cuda" | "cpu" | "fake" (CPU compute under platform/fake.py's collective checks)
    device_name: str  # e.g. "Ascend910B3", "NVIDIA H200", "cpu"

    @property
    def backend(self) -> str:
        return _BACKENDS[self.kind]

    def device(self, local_rank: Optional[int] = None) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.kind == "fake":
            return torch.device("cpu", local_rank)  # the CPU, spelled with an index: "on the device"
        return torch.device(self.kind, local_rank)

    @property
    def module(self):
        """torch.cuda or torch.npu (None on CPU): used only inside platform/."""
        if self.kind in ("cpu", "fake"):
            return None
        return getattr(torch, self.kind)


def backend_module(kind: str):
    """platform.npu / platform.cuda for an accelerator kind, None for cpu / fake."""
    if kind == "npu":
        from . import npu
        return npu
    if kind == "cuda":
        from . import cuda
        return cuda
    return None


def detect_platform() -> Platform:
    from . import cuda, npu
    forced = os.environ.get("MEGATRON_ASCEND_DEVICE")
    if forced in _FAKE:
        return Platform("fake", f"fake-{_FAKE[forced]}")
    if forced:
        if forced not in _BACKENDS or forced == "fake":
            raise ValueError(f"MEGATRON_ASCEND_DEVICE={forced!r} is unknown; use npu, cuda, cpu, fake (HCCL rules) "
                             f"or fake-nccl")
        kind = forced
    elif npu.available():  # first: transfer_to_npu makes torch.cuda answer for an NPU too
        kind = "npu"
    elif cuda.available():
        kind = "cuda"
    else:
        kind = "cpu"
    if kind == "npu":
        npu.torch_npu_module()
    mod = backend_module(kind)
    return Platform(kind, mod.device_name(0) if mod is not None else "cpu")


_PLATFORM: Optional[Platform] = None


def get_platform() -> Platform:
    global _PLATFORM
    if _PLATFORM is None:
        _PLATFORM = detect_platform()
    return _PLATFORM


def set_platform(plat: Optional[Platform]) -> Optional[Platform]:
    """Replace the detected platform (the fake accelerator and tests); returns the previous one (None: detect
    again on the next get_platform)."""
    global _PLATFORM
    prev, _PLATFORM = _PLATFORM, plat
    return prev


HOST_ALLOCATOR_ENV = "MA_HOST_ALLOCATOR"  # "system" leaves glibc's malloc settings alone


def tune_host_allocator() -> bool:
    """Keep freed host memory in the process instead of returning it to the OS (glibc ``mallopt``: blocks up to
    32 MiB come from the heap, whose top is not trimmed). A CPU training step frees and re-allocates the same
    multi-MiB activation tensors every micro-batch; by default glibc unmaps / trims them and every new one
    page-faults again (measured: a 2 MiB row gather took 0.45 ms inside a step against 0.06 ms warm). This is
    the host analogue of the accelerator's caching allocator: the resident size stays at its high-water mark.
    Returns True when applied (Linux glibc, and ``MA_HOST_ALLOCATOR`` is not ``system``)."""
    if os.environ.get(HOST_ALLOCATOR_ENV, "") == "system":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl): leave the allocator alone
        return False


_GROUP_TIMEOUT: Optional[datetime.timedelta] = None  # the process-group timeout init_distributed used


def apply_runtime_options(plat: Platform, options) -> None:
    """The back end's environment (before any communicator / device use) and runtime switches, each recorded
    as a start-up line (runtime.startup_lines)."""
    from . import runtime
    mod = backend_module(plat.kind)
    if mod is None:
        ignored = options.hccl_flags_given() + [f for f, on in (("--device-launch-blocking", options.launch_blocking),
                                                                 ("--jit-compile", options.jit_compile)) if on]
        if ignored:
            runtime.record(f"platform: accepted, no effect on {plat.kind}: {' '.join(ignored)}")
        if options.deterministic:  # CPU kernels and gloo reduce in a fixed order for a fixed thread count / world
            torch.use_deterministic_algorithms(True)
            runtime.record(f"platform {plat.kind}: torch.use_deterministic_algorithms(True) (--deterministic; keep "
                           f"the thread count and the world size the same between runs)")
        return
    env, notes = mod.environment(options)
    os.environ.update(env)
    notes += mod.configure(options)
    if notes:
        runtime.record(f"platform {plat.kind}: " + "; ".join(notes))


def init_distributed(timeout_minutes: Optional[float] = None, options=None) -> Platform:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), on device
    ``LOCAL_RANK`` with the platform's backend (hccl / nccl / gloo).

    ``options`` (runtime.RuntimeOptions, from the command line) sets the back end's environment first (HCCL reads
    it when the communicators are created), checks that LOCAL_RANK has a device, and gives every group the
    process-group timeout (``new_group`` below: torch's own default for a subgroup is 10 min on NCCL, not the
    world group's). Works without torchrun too (a single process: world 1 on a free local port)."""
    import torch.distributed as dist
    from .runtime import RuntimeOptions

    global _GROUP_TIMEOUT
    options = options if options is not None else RuntimeOptions()
    if timeout_minutes is None:
        timeout_minutes = options.timeout_minutes
    plat = get_platform()
    if dist.is_initialized():  # initialised by the caller (tests, another launcher): the switches still apply
        apply_runtime_options(plat, options)
        return plat
    apply_runtime_options(plat, options)
    if plat.module is None:
        tune_host_allocator()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    mod = backend_module(plat.kind)
    if mod is not None:
        mod.check_local_rank(int(os.environ.get("LOCAL_RANK", 0)), mod.device_count())
        plat.module.set_device(plat.device())
    _GROUP_TIMEOUT = datetime.timedelta(minutes=timeout_minutes)
    store = _restart_store(_GROUP_TIMEOUT)
    if store is not None:
        dist.init_process_group(backend=plat.backend, timeout=_GROUP_TIMEOUT, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend=plat.backend, timeout=_GROUP_TIMEOUT)
    if plat.kind == "fake":
        from .fake import FakeAccelerator
        FakeAccelerator(plat.device_name.split("-", 1)[1]).install()  # for the life of the process
    return plat


def _restart_store(timeout):
    """Under ``torchrun --max-restarts`` the agent's TCPStore is shared by every attempt (torch's default), so
    the keys of a killed attempt (each rank's gloo / NCCL / HCCL address) are still there when the restarted
    ranks meet, and a rank can read a dead peer's address and wait for it until the process-group timeout.
    A store prefixed by the attempt (TORCHELASTIC_RESTART_COUNT) keeps every attempt's keys apart. None when
    not launched by torchelastic (init_process_group's env:// store is used)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    import torch.distributed as dist
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"megatron_ascend/attempt_{attempt}", base)


def new_group(ranks, backend: Optional[str] = None):
    """``dist.new_group`` with the process-group timeout of init_distributed (torch would give a subgroup its
    backend's default instead: 10 min on NCCL, 30 on others)."""
    import torch.distributed as dist
    kw = {} if _GROUP_TIMEOUT is None else {"timeout": _GROUP_TIMEOUT}
    if backend is not None:
        kw["backend"] = backend
    return dist.new_group(ranks, **kw)


def host_ints_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of host ints on ``device`` without waiting for the device: staged in pinned memory and
    copied with non_blocking (``torch.tensor(values, device=...)`` copies from pageable memory, which
    synchronises the stream: the host would wait for every kernel queued before it)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def synchronize() -> None:
    mod = get_platform().module
    if mod is not None:
        mod.synchronize()


def reset_peak_memory_stats() -> None:
    mod = get_platform().module
    if mod is not None:
        mod.reset_peak_memory_stats()


def memory_stats() -> Dict[str, int]:
    """Allocator figures in bytes: allocated, max_allocated, reserved, max_reserved from the caching allocator of
    torch.cuda / torch.npu (the same API, ascend_npu.md §7.1), or the process RSS (allocated, reserved) and peak
    RSS (max_allocated, max_reserved) on CPU."""
    mod = get_platform().module
    if mod is not None:
        return {"allocated": int(mod.memory_allocated()), "max_allocated": int(mod.max_memory_allocated()),
                "reserved": int(mod.memory_reserved()), "max_reserved": int(mod.max_memory_reserved())}
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    peak = 0
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        pass
    return {"allocated": rss, "max_allocated": peak, "reserved": rss, "max_reserved": peak}


def get_rng_state() -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    mod = get_platform().module
    if mod is not None:
        state["device"] = mod.get_rng_state()
    return state


def set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    mod = get_platform().module
    if mod is not None and "device" in state:
        mod.set_rng_state(state["device"])
