"""``--deterministic``: what bitwise-repeatable training needs on each platform (docs/NPU.md and
docs/USER_GUIDE.md "Determinism" list it for users).

Owns ``SETTINGS`` (per platform: environment variables, each with why) and ``enable_deterministic(kind)``,
which the trainer calls before the process groups and the model exist (collective libraries read their
variables when a communicator is created; cuBLAS reads its workspace setting when its handle is created).

* every platform: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises
  instead of running a non-deterministic one); the same seed on every rank is the trainer's (``--seed``).
* cpu (gloo): the above is all; CPU kernels reduce in a fixed order for a fixed thread count, so keep
  ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` the same between runs (torchrun sets 1 per process);
  gloo's ring all-reduce sums in a fixed order for a fixed world size.
* cuda (nccl): ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (deterministic cuBLAS GEMMs, required by
  use_deterministic_algorithms), ``NCCL_ALGO=Ring`` (Tree / NVLS reduce in an order that depends on timing;
  Megatron's --deterministic-mode does the same), ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0`` (Transformer Engine
  kernels, when present); cuDNN benchmark off, cuDNN deterministic on.
* npu (hccl): ``HCCL_DETERMINISTIC=True`` (deterministic reduction in HCCL collectives),
  ``LCCL_DETERMINISTIC=1`` (the same for LCCL), ``CLOSE_MATMUL_K_SHIFT=1`` (no K-axis shifted matmul), as
  MindSpeed's --npu-deterministic; the topology must stay the same (HCCL picks algorithms by topology).

A variable the user already set to another value is an error naming it (a run asked to be deterministic
would not be); one set to the same value is kept. Returns what it set, for the start-up log.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from ..config import ConfigError

SETTINGS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "cpu": {},
    "cuda": {
        "CUBLAS_WORKSPACE_CONFIG": (":4096:8", "deterministic cuBLAS workspace"),
        "NCCL_ALGO": ("Ring", "ring reductions sum in a fixed order (Tree / NVLS do not)"),
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0", "deterministic Transformer Engine kernels"),
    },
    "npu": {
        "HCCL_DETERMINISTIC": ("True", "deterministic HCCL reductions"),
        "LCCL_DETERMINISTIC": ("1", "deterministic LCCL reductions"),
        "CLOSE_MATMUL_K_SHIFT": ("1", "no K-axis shifted matmul"),
    },
}
_EQUIVALENT = {"True": ("true", "1", "True", "TRUE"), "1": ("1", "true", "True"), "Ring": ("Ring", "ring")}


def enable_deterministic(kind: str) -> List[str]:
    """Apply the settings of platform ``kind`` (npu / cuda / cpu); ConfigError on a conflicting variable."""
    if kind not in SETTINGS:
        raise ConfigError(f"--deterministic: unknown platform {kind!r}")
    applied = []
    for var, (value, why) in SETTINGS[kind].items():
        cur = os.environ.get(var)
        if cur is not None and cur not in _EQUIVALENT.get(value, (value,)):
            raise ConfigError(f"--deterministic needs {var}={value} ({why}) but the environment has {var}={cur}; "
                              f"unset it or drop --deterministic")
        os.environ[var] = cur if cur is not None else value
        applied.append(f"{var}={os.environ[var]}")
    torch.use_deterministic_algorithms(True)
    applied.append("torch.use_deterministic_algorithms(True)")
    if kind == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        applied.append("cudnn.deterministic, no cudnn.benchmark")
    return applied
