"""Kernel-table implementations built on torch's own fused kernels (CPU, CUDA and the fake accelerator).

* ``rms_norm`` -> ``torch.nn.functional.rms_norm`` (one fused kernel forward and backward) for fp32 input and
  weight, where it equals the reference bitwise (tests/test_platform.py, the model parity tests); other dtypes
  decline (the reference casts before the weight multiply, a rounding F.rms_norm does not reproduce);
* ``attention`` -> ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN on
  CUDA, flash on CPU) where that device, dtype and head-dim pair has a kernel that keeps q, k, v themselves for
  backward (probed once per key on a tiny problem); elsewhere it declines to the reference, because SDPA's
  math fallback keeps scaled copies of q and k (more memory than the reference's explicit form, and selective
  ``mla_up_proj`` recompute would free nothing).

Registered on import by kernels._load for every platform kind but "npu" (the Ascend bindings come first there;
kernels_npu.py).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import kernels

KINDS = ("cpu", "cuda", "fake")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return kernels.fallback("rms_norm", f"F.rms_norm rounds {x.dtype} differently from the reference")(x, weight, eps)


_SDPA_KEEPS_INPUTS: Dict[tuple, bool] = {}


def sdpa_keeps_inputs(q: torch.Tensor, v: torch.Tensor, masked: bool) -> bool:
    """Whether torch's scaled_dot_product_attention keeps q, k, v themselves for backward (a fused / flash
    kernel) for this device, dtype and head dims, found once by running it on a tiny problem. It does not when
    it falls back to its math path (e.g. on CPU when q/k and v head dims differ): that path saves scaled
    copies of q and k, so dropping q/k/v (selective ``mla_up_proj`` recompute) would free nothing."""
    key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1], masked)
    if key not in _SDPA_KEEPS_INPUTS:
        s, dq, dv = 4, q.shape[-1], v.shape[-1]
        with torch.enable_grad():
            t = [torch.ones(s, 1, 1, d, dtype=q.dtype, device=q.device, requires_grad=True) for d in (dq, dq, dv)]
            kept = set()

            def pack(x):
                kept.add(x.untyped_storage().data_ptr())
                return x

            mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril().view(1, 1, s, s) if masked else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in t), attn_mask=mask,
                                               is_causal=not masked)
        _SDPA_KEEPS_INPUTS[key] = all(x.untyped_storage().data_ptr() in kept for x in t)
    return _SDPA_KEEPS_INPUTS[key]


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    scale: float) -> torch.Tensor:
    if not sdpa_keeps_inputs(q, v, mask is not None):
        return kernels.fallback("attention", f"SDPA has no kernel keeping q, k, v for {q.device.type} {q.dtype} "
                                             f"head dims {q.shape[-1]}/{v.shape[-1]}")(q, k, v, mask, scale)
    qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
    if mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    s, b = q.shape[0], q.shape[1]
    return o.permute(2, 0, 1, 3).reshape(s, b, -1)


if hasattr(F, "rms_norm"):
    kernels.register_fused("rms_norm", _rms_norm, "torch.rms_norm", kinds=KINDS)
kernels.register_fused("attention", _sdpa_attention, "torch.sdpa", kinds=KINDS)
