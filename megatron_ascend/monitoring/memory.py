"""Memory figures for the log line and TensorBoard (Megatron's mem-*-bytes names).

On an accelerator these are the caching allocator's allocated / max-allocated / reserved bytes; on CPU the
process RSS (allocated, reserved) and peak RSS (max-allocated), from platform.memory_stats.
"""
from __future__ import annotations

from typing import Dict

from .. import platform


def memory_scalars() -> Dict[str, float]:
    m = platform.memory_stats()
    return {"mem-allocated-bytes": float(m["allocated"]), "mem-max-allocated-bytes": float(m["max_allocated"]),
            "mem-reserved-bytes": float(m["reserved"])}


def format_memory(scalars: Dict[str, float]) -> str:
    gib = 1024.0 ** 3
    return (f"mem allocated (GiB): {scalars['mem-allocated-bytes'] / gib:.2f} | "
            f"mem max allocated (GiB): {scalars['mem-max-allocated-bytes'] / gib:.2f}")
