"""The only package that knows whether we run on an Ascend NPU, CUDA or CPU.

Owns: device selection per local rank, backend (hccl / nccl / gloo), distributed init, RNG state
capture/restore for the accelerator, memory statistics, the device table (devices.py: peak FLOP/s, HBM,
node shape, bandwidths, each with its source; peak_flops.py is its MFU view), what --deterministic needs per
platform (determinism.py), and the fused-kernel table
(torch_npu / MindSpeed ops when present, plain-PyTorch references otherwise).

Nothing outside this package imports torch_npu or calls torch.cuda / torch.npu directly.
"""
from .device import (Platform, detect_platform, get_platform, get_rng_state, init_distributed, memory_stats,
                     reset_peak_memory_stats, set_rng_state, synchronize, tune_host_allocator)
from .peak_flops import PEAK_TFLOPS_BF16, peak_tflops
from .determinism import enable_deterministic
from .devices import DEVICES, DeviceSpec, device_spec, find_device, known_devices
from . import devices, kernels

__all__ = ["Platform", "detect_platform", "get_platform", "init_distributed", "memory_stats",
           "reset_peak_memory_stats", "synchronize", "tune_host_allocator", "get_rng_state", "set_rng_state", "PEAK_TFLOPS_BF16", "peak_tflops", "kernels",
           "devices", "DEVICES", "DeviceSpec", "device_spec", "find_device", "known_devices", "enable_deterministic"]
