"""Fused-kernel table: one name per operation, the plain-PyTorch reference always present, the
Ascend (torch_npu / MindSpeed) or CUDA implementation registered when it can be imported.

Model code calls ``kernels.get("rms_norm")(x, weight, eps)`` and never asks which platform it is on.
The references here are the numerical oracle for every fused path (tests compare against them).

Status: the torch_npu / MindSpeed bindings (npu_rms_norm, npu_fusion_attention, npu_grouped_matmul,
npu_moe_token_permute, npu_swiglu, npu_rotary_mul) need Ascend hardware and are a later issue. On every
platform ``rms_norm`` has a fused entry: torch's own ``F.rms_norm`` (one fused kernel forward and backward)
for fp32 input and weight, where it equals the reference bitwise (checked by tests/test_platform.py's
comparison and the model parity tests); other dtypes take the reference (which computes in fp32 and casts
before the weight multiply, a rounding F.rms_norm does not reproduce). ``MEGATRON_ASCEND_KERNELS=reference``
forces the references.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F

_REFERENCE: Dict[str, Callable] = {}
_FUSED: Dict[str, Callable] = {}


def reference(name: str):
    def deco(fn):
        _REFERENCE[name] = fn
        return fn
    return deco


def register_fused(name: str, fn: Callable) -> None:
    if name not in _REFERENCE:
        raise KeyError(f"no reference implementation named {name!r}; register the reference first")
    _FUSED[name] = fn


def get(name: str) -> Callable:
    if os.environ.get("MEGATRON_ASCEND_KERNELS") != "reference" and name in _FUSED:
        return _FUSED[name]
    return _REFERENCE[name]


def per_group_weight_grad(device: torch.device) -> bool:
    """Whether a grouped (per-expert) weight gradient runs as one GEMM per group written into ``main_grad``
    (True on CPU: the GEMMs cost the same as torch._grouped_mm's 2-D x 2-D mode, but writing into the warm
    grad buffer avoids allocating, page-faulting and adding a fresh [E, out, in] gradient -- 5.5 vs 15.9 ms at
    the large benchmark's expert shapes, bench/moe_dispatch.py) rather than one grouped-GEMM launch
    (accelerators: a caching allocator, and per-group launches would be the slow path)."""
    return torch.device(device).type == "cpu"


def table() -> Dict[str, str]:
    """name -> 'fused' or 'reference' (what get() returns now)."""
    return {n: ("fused" if get(n) is not _REFERENCE[n] else "reference") for n in sorted(_REFERENCE)}


@reference("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF/DeepSeek RMSNorm: computed in fp32, cast back, then scaled by the weight."""
    dtype = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


@reference("swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; V4 clamps gate to <= limit and up to [-limit, limit] when limit > 0."""
    if limit and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


@reference("grouped_matmul")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [T, k] sorted by group, weight [G, k, n], counts [G] (sum T) -> [T, n]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[-1]) + 0 * weight.sum()
    outs = []
    start = 0
    for g, c in enumerate(counts.tolist()):
        if c:
            outs.append(x[start:start + c] @ weight[g])
        start += c
    return torch.cat(outs, 0) if outs else x.new_zeros(0, weight.shape[-1])


def _rms_norm_torch_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm(x, weight, eps)


if hasattr(F, "rms_norm"):
    register_fused("rms_norm", _rms_norm_torch_fused)


def _register_platform_kernels() -> None:
    """Bind torch_npu / MindSpeed ops when present. Kept as the one hook for the NPU-kernel issue."""
    try:
        import torch_npu  # noqa: F401  (only imported here, in platform/)
    except Exception:
        return
    # The NPU bindings are registered by the NPU-kernel issue once they can be tested on Ascend hardware.


_register_platform_kernels()
