"""Ascend NPU back end (910B / 910C): torch_npu, HCCL, the job environment, compile mode, determinism, profiler.

Everything here follows ../shared/reference/ascend_npu.md (section numbers below); none of it has run on an NPU
yet (docs/ASCEND.md, "What was verified where"). The tests drive it with a fake ``torch_npu`` module.

* device per local rank: ``npu:<LOCAL_RANK>`` after ``ASCEND_RT_VISIBLE_DEVICES`` re-indexing (§8.2); a local
  rank without a device is a ConfigError before anything starts (``check_local_rank``);
* the environment (``environment``): HCCL_CONNECT_TIMEOUT, HCCL_EXEC_TIMEOUT, HCCL_BUFFSIZE from
  --hccl-connect-timeout / --hccl-exec-timeout / --hccl-buffsize, HCCL_DETERMINISTIC=true (+ MindSpeed's
  LCCL_DETERMINISTIC=1 and CLOSE_MATMUL_K_SHIFT=1) with --deterministic, ASCEND_LAUNCH_BLOCKING=1 with --device-launch-blocking; a flag
  replaces an inherited value (and says so), an inherited value without a flag is kept. It must be in the
  environment before the communicators exist (init_distributed applies it first) -- §7.3, §8.2;
* runtime switches (``configure``): ``torch_npu.npu.set_compile_mode(jit_compile=...)`` (False, the A2 / A3
  default, unless --jit-compile; §7.2), ``torch.use_deterministic_algorithms(True)`` with --deterministic (§7.3);
  a process where ``torch_npu.contrib.transfer_to_npu`` has rewritten ``torch.cuda`` (MindSpeed imports it) is
  named at start-up (§7.5): we never import it and use ``torch.npu`` directly;
* the profiler (``profiler``): ``torch_npu.profiler.profile`` with CPU + NPU activities and a TensorBoard trace
  handler (§7.4), viewed with MindStudio Insight.

Memory statistics come from ``torch.npu``'s caching allocator, which mirrors ``torch.cuda``'s API (§7.1):
device.py reads both the same way.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..config import ConfigError
from .runtime import RuntimeOptions

NAME, BACKEND = "npu", "hccl"
HCCL_EXEC_TIMEOUT_DEFAULT = 1836  # s, CANN 8.5 default on A2 / A3 (§8.2)
VISIBLE = "ASCEND_RT_VISIBLE_DEVICES"


def torch_npu_module():
    """``torch_npu`` (importing it registers ``torch.npu`` and the ``hccl`` backend), or None."""
    try:
        return importlib.import_module("torch_npu")
    except Exception:
        return None


def available() -> bool:
    if torch_npu_module() is None:
        return False
    try:
        return torch.npu.device_count() > 0  # type: ignore[attr-defined]
    except Exception:
        return False


def device_count() -> int:
    return int(torch.npu.device_count())  # type: ignore[attr-defined]


def device_name(index: int = 0) -> str:
    return str(torch.npu.get_device_name(index))  # type: ignore[attr-defined]


def check_local_rank(local_rank: int, count: int, environ: Mapping[str, str] = os.environ) -> None:
    """One device per local rank: LOCAL_RANK must index a visible NPU."""
    if not 0 <= local_rank < count:
        vis = environ.get(VISIBLE)
        raise ConfigError(f"LOCAL_RANK {local_rank} has no NPU: {count} visible"
                          + (f" ({VISIBLE}={vis})" if vis else "")
                          + f"; launch at most {count} processes per node (torchrun --nproc-per-node {count})")


def environment(opts: RuntimeOptions, environ: Mapping[str, str] = os.environ) -> Tuple[Dict[str, str], List[str]]:
    """(variables to set, start-up notes) for these options; pure (tests call it with a dict)."""
    want: Dict[str, Tuple[str, str]] = {}  # var -> (value, why)
    if opts.hccl_connect_timeout is not None:
        want["HCCL_CONNECT_TIMEOUT"] = (str(opts.hccl_connect_timeout), "--hccl-connect-timeout")
    if opts.hccl_exec_timeout is not None:
        want["HCCL_EXEC_TIMEOUT"] = (str(opts.hccl_exec_timeout), "--hccl-exec-timeout")
    if opts.hccl_buffsize is not None:
        want["HCCL_BUFFSIZE"] = (str(opts.hccl_buffsize), "--hccl-buffsize")
    if opts.deterministic:
        want["HCCL_DETERMINISTIC"] = ("true", "--deterministic")
        want["LCCL_DETERMINISTIC"] = ("1", "--deterministic (LCCL collectives, as MindSpeed's seed_all)")
        want["CLOSE_MATMUL_K_SHIFT"] = ("1", "--deterministic (as MindSpeed's extend_seed_all)")
    if opts.launch_blocking:
        want["ASCEND_LAUNCH_BLOCKING"] = ("1", "--device-launch-blocking")
    env: Dict[str, str] = {}
    notes: List[str] = []
    for var, (val, why) in want.items():
        old = environ.get(var)
        env[var] = val
        notes.append(f"{var}={val} ({why}" + (f"; replaces the environment's {old}" if old not in (None, val)
                                                else "") + ")")
    exec_timeout = int(env.get("HCCL_EXEC_TIMEOUT", environ.get("HCCL_EXEC_TIMEOUT", HCCL_EXEC_TIMEOUT_DEFAULT)))
    pg_seconds = opts.timeout_minutes * 60
    if exec_timeout == 0 or exec_timeout >= pg_seconds:
        notes.append(f"note: HCCL_EXEC_TIMEOUT {exec_timeout} s (0 = never) is not below the process-group timeout "
                     f"{pg_seconds:.0f} s (--distributed-timeout-minutes): the watchdog fires before HCCL reports the "
                     f"hung collective; torch_npu advises a process-group timeout above both HCCL timeouts")
    return env, notes


def configure(opts: RuntimeOptions, torch_npu=None) -> List[str]:
    """Runtime switches after ``import torch_npu``; returns start-up notes."""
    torch_npu = torch_npu if torch_npu is not None else torch_npu_module()
    notes: List[str] = []
    if torch_npu is None:
        return notes
    npu = getattr(torch_npu, "npu", None)
    set_mode = getattr(npu, "set_compile_mode", None)
    if set_mode is not None:
        set_mode(jit_compile=bool(opts.jit_compile))
        notes.append(f"torch_npu.npu.set_compile_mode(jit_compile={bool(opts.jit_compile)})")
    if opts.deterministic:
        torch.use_deterministic_algorithms(True)
        notes.append("torch.use_deterministic_algorithms(True)")
    if transfer_to_npu_active(torch_npu):
        notes.append("note: torch_npu.contrib.transfer_to_npu is active in this process (MindSpeed imports it): "
                     "torch.cuda answers for the NPU; megatron_ascend uses torch.npu / hccl directly, other "
                     "libraries here see the patched torch.cuda")
    return notes


def transfer_to_npu_active(torch_npu=None) -> bool:
    """Whether ``torch.cuda`` has been rewritten to ``torch_npu.npu`` (ascend_npu.md §7.5)."""
    torch_npu = torch_npu if torch_npu is not None else torch_npu_module()
    if torch_npu is None:
        return False
    mod = getattr(torch.cuda.is_available, "__module__", "") or ""
    return torch.cuda is getattr(torch_npu, "npu", None) or mod.startswith("torch_npu")


def profiler(save_path: str, torch_npu=None):
    """A started-on-demand profiler (``start()`` / ``stop()``) writing TensorBoard traces under ``save_path``."""
    torch_npu = torch_npu if torch_npu is not None else torch_npu_module()
    p = torch_npu.profiler
    return p.profile(activities=[p.ProfilerActivity.CPU, p.ProfilerActivity.NPU], record_shapes=True,
                     profile_memory=True, on_trace_ready=p.tensorboard_trace_handler(save_path))
