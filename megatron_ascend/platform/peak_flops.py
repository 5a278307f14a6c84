"""Dense bf16 peak TFLOP/s per device, for MFU: a view of the device table (platform/devices.py, where every
figure has its source and grade). Ascend 910C is listed per *logical device* (one die; an A3 node shows 16
devices). Override with --peak-tflops when your part differs, and prefer a measured GEMM ceiling
(bench/mfu.py measures one) for honest utilisation figures.
"""
from __future__ import annotations

from typing import Dict, Optional

from .devices import DEVICES, find_device

# every name and alias the table knows -> its peak (kept for callers that list the table)
PEAK_TFLOPS_BF16: Dict[str, float] = {n: d.tflops.value for d in DEVICES.values() for n in (d.name,) + d.aliases}


def peak_tflops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device, or None when unknown (CPU: measure instead)."""
    if override:
        return float(override)
    spec = find_device(device_name)
    return spec.tflops.value if spec else None
