"""The only package that knows whether we run on an Ascend NPU, CUDA or CPU.

Owns: device selection per local rank, backend (hccl / nccl / gloo), distributed init and groups with the job's
timeout, the back ends' environment and runtime switches (npu.py: HCCL variables, compile mode, determinism,
torch_npu profiler; cuda.py: the same for CUDA; runtime.py: the options from the command line), RNG state
capture/restore for the accelerator, memory statistics, the device table (devices.py: peak FLOP/s, HBM, node
shape, bandwidths, each with its source; peak_flops.py is its MFU view), the fused-kernel table (kernels.py:
torch_npu / MindSpeed / torch ops when present, plain-PyTorch references always), the step profiler
(profiler.py) and the fake accelerator for CPU tests (fake.py).

Nothing outside this package imports torch_npu or calls torch.cuda / torch.npu directly.
"""
from .device import (Platform, detect_platform, get_platform, get_rng_state, host_ints_to_device,
                     init_distributed, memory_stats, new_group, reset_peak_memory_stats, set_platform, set_rng_state, synchronize,
                     tune_host_allocator)
from .peak_flops import PEAK_TFLOPS_BF16, peak_tflops
from .devices import DEVICES, DeviceSpec, device_spec, find_device, known_devices
from .runtime import ProfileOptions, RuntimeOptions
from . import devices, kernels, profiler


def startup_lines():
    """What the platform layer set up (environment, runtime switches, flags without effect here) and the one
    kernel-table line: printed once by the trainer."""
    from .runtime import startup_lines as lines
    return lines() + [kernels.startup_line()]


__all__ = ["Platform", "detect_platform", "get_platform", "set_platform", "init_distributed", "new_group",
           "host_ints_to_device",
           "memory_stats", "reset_peak_memory_stats", "synchronize", "tune_host_allocator", "get_rng_state",
           "set_rng_state", "PEAK_TFLOPS_BF16", "peak_tflops", "kernels", "devices", "DEVICES", "DeviceSpec",
           "device_spec", "find_device", "known_devices", "RuntimeOptions", "ProfileOptions", "startup_lines"]
