"""CUDA back end (NCCL): device per local rank, launch blocking, determinism, the profiler.

* device per local rank: ``cuda:<LOCAL_RANK>`` (after CUDA_VISIBLE_DEVICES re-indexing); a local rank without a
  device is a ConfigError before anything starts;
* the environment (``environment``): CUDA_LAUNCH_BLOCKING=1 with --device-launch-blocking,
  CUBLAS_WORKSPACE_CONFIG=:4096:8, NCCL_ALGO=Ring and NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 with --deterministic
  (cuBLAS needs the first for deterministic GEMMs, PyTorch's "Reproducibility" notes; NCCL's Tree / NVLS
  algorithms reduce in a timing-dependent order); the HCCL flags and --jit-compile are Ascend-only and are named as having no effect;
* runtime switches (``configure``): ``torch.use_deterministic_algorithms(True)``, cuDNN benchmark off and cuDNN
  deterministic with --deterministic;
* the profiler: ``torch.profiler.profile`` with CPU + CUDA activities and a TensorBoard trace handler.

NCCL's own timeout is the process-group timeout (--distributed-timeout-minutes, device.py passes it to every
group). Memory statistics come from ``torch.cuda``'s caching allocator (device.py).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Tuple

import torch

from ..config import ConfigError
from .runtime import RuntimeOptions

NAME, BACKEND = "cuda", "nccl"
VISIBLE = "CUDA_VISIBLE_DEVICES"


def available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    return int(torch.cuda.device_count())


def device_name(index: int = 0) -> str:
    return str(torch.cuda.get_device_name(index))


def check_local_rank(local_rank: int, count: int, environ: Mapping[str, str] = os.environ) -> None:
    if not 0 <= local_rank < count:
        vis = environ.get(VISIBLE)
        raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: {count} visible"
                          + (f" ({VISIBLE}={vis})" if vis else "")
                          + f"; launch at most {count} processes per node (torchrun --nproc-per-node {count})")


def environment(opts: RuntimeOptions, environ: Mapping[str, str] = os.environ) -> Tuple[Dict[str, str], List[str]]:
    env: Dict[str, str] = {}
    notes: List[str] = []
    if opts.launch_blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
        notes.append("CUDA_LAUNCH_BLOCKING=1 (--device-launch-blocking)")
    if opts.deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = environ.get("CUBLAS_WORKSPACE_CONFIG") or ":4096:8"
        notes.append(f"CUBLAS_WORKSPACE_CONFIG={env['CUBLAS_WORKSPACE_CONFIG']} (--deterministic)")
        # ring reductions sum in a fixed order; Tree / NVLS do not (Megatron's --deterministic-mode does the same)
        for var, val in (("NCCL_ALGO", "Ring"), ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")):
            old = environ.get(var)
            env[var] = val
            notes.append(f"{var}={val} (--deterministic" + (f"; replaces the environment's {old}" if old not in
                                                             (None, val) else "") + ")")
    ignored = opts.hccl_flags_given() + (["--jit-compile"] if opts.jit_compile else [])
    if ignored:
        notes.append(f"accepted, no effect on cuda: {' '.join(ignored)} (Ascend only)")
    return env, notes


def configure(opts: RuntimeOptions) -> List[str]:
    notes: List[str] = []
    if opts.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        notes.append("torch.use_deterministic_algorithms(True), cudnn.benchmark off, cudnn.deterministic")
    return notes


def profiler(save_path: str):
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                   profile_memory=True, on_trace_ready=tensorboard_trace_handler(save_path))
