"""Throughput: tokens/s, model TFLOP/s per device and MFU.

``Throughput(flops_per_token, world_size, peak_tflops)``; ``.compute(tokens, seconds)`` returns tokens/s (whole job),
TFLOP/s per device (Megatron's "throughput per GPU") and MFU = achieved / peak (PaLM definition, model FLOPs, so
recomputation is not credited). The peak comes from --peak-tflops, else platform.peak_tflops(device name) (the
dense bf16 figure of the device table, platform/devices.py, the entry tools/plan.py --device uses), else -- on
CPU -- a matmul ceiling measured once at startup by
``measure_matmul_tflops`` (so "MFU" on CPU means "fraction of what this CPU's GEMM reaches"), else n/a.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch


def measure_matmul_tflops(n: int = 512, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Median TFLOP/s of an n x n x n matmul on this process's device (a ceiling for CPU MFU)."""
    from .. import platform
    dev = platform.get_platform().device()
    g = torch.Generator(device=dev).manual_seed(0)  # not the global RNG: a resumed run must draw what the first did
    a = torch.randn(n, n, dtype=dtype, device=dev, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=dev, generator=g)
    for _ in range(2):
        a @ b
    platform.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        platform.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / max(times[len(times) // 2], 1e-9) / 1e12


@dataclass
class Throughput:
    flops_per_token: float
    world_size: int
    peak_tflops: Optional[float] = None  # per device; None: MFU is n/a

    def compute(self, tokens: float, seconds: float) -> Dict[str, Optional[float]]:
        seconds = max(seconds, 1e-9)
        tps = tokens / seconds
        tflops = self.flops_per_token * tps / self.world_size / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        return {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / self.world_size,
                "tflops_per_device": tflops, "mfu": mfu}


def resolve_peak_tflops(override: Optional[float], measure_on_cpu: bool = True) -> Optional[float]:
    """--peak-tflops, else the device table's entry for this device, else (CPU) a measured matmul ceiling, else None."""
    from .. import platform
    if override:
        return float(override)
    plat = platform.get_platform()
    peak = platform.peak_tflops(plat.device_name)
    if peak is None and plat.kind == "cpu" and measure_on_cpu:
        peak = measure_matmul_tflops()
    return peak
