"""Dense bf16 peak TFLOP/s per device, for MFU. Sources: vendor datasheets and
../shared/reference/{ascend_npu,performance_reliability_anchors}.md. Ascend 910C is listed per *logical
device* (one die; an A3 node shows 16 devices). Override with --peak-tflops when your part differs, and
prefer a measured GEMM ceiling (bench/mfu.py measures one) for honest utilisation figures.
"""
from __future__ import annotations

from typing import Optional

PEAK_TFLOPS_BF16 = {
    # Ascend (per device as torch_npu reports it)
    "Ascend910B1": 378.9,
    "Ascend910B2": 353.9,
    "Ascend910B2C": 353.9,
    "Ascend910B3": 294.9,
    "Ascend910B4": 270.0,
    "Ascend910_9391": 376.0,  # 910C die (A3), ~752 TFLOP/s per dual-die package
    "Ascend910_9392": 376.0,
    "Ascend910_9381": 376.0,
    "Ascend910_9382": 376.0,
    "Ascend910C": 376.0,
    # NVIDIA (dense, no sparsity)
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "B200": 2250.0,
    "GB200": 2500.0,
}


def peak_tflops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device, or None when unknown (CPU: measure instead)."""
    if override:
        return float(override)
    name = device_name.replace(" ", "")
    best = None
    for key, val in PEAK_TFLOPS_BF16.items():  # longest matching key wins (H100 vs H100NVL etc.)
        if key.lower() in name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, val)
    return best[1] if best else None
