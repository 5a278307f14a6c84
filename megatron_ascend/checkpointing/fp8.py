"""DeepSeek FP8 block format (deepseek_architecture.md 5.2): float8_e4m3fn weights with one fp32
``weight_scale_inv`` per 128 x 128 block, shape [ceil(M/128), ceil(N/128)]; W = q.float() * s per block.

``scale_fmt: ue8m0`` (V3.1 / V3.2) only changes how the scales were chosen (powers of two); they are stored
as fp32 all the same, so dequantisation does not need to know. The V4 ``float8_e8m0fnu`` ``.scale`` tensors
are not handled here (V4 conversion is a later issue).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

BLOCK = 128
FP8_MAX = 448.0


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype=torch.bfloat16,
                      block: int = BLOCK) -> torch.Tensor:
    """``q`` [M, N] float8_e4m3fn, ``scale_inv`` [ceil(M/b), ceil(N/b)] fp32 -> [M, N] ``out_dtype``."""
    if q.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(q.shape)}")
    m, n = q.shape
    want = (math.ceil(m / block), math.ceil(n / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"FP8 weight of shape {(m, n)} needs a weight_scale_inv of shape {want} "
                         f"({block}x{block} blocks), got {tuple(scale_inv.shape)}")
    s = scale_inv.float().repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
    return (q.to(torch.float32) * s).to(out_dtype)


def quantize_blocks(w: torch.Tensor, block: int = BLOCK, ue8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse (for tests and exporting FP8): per block s = amax / 448 (ue8m0: the next power of two),
    q = w / s. Edge blocks are zero-padded for the amax, then cropped."""
    m, n = w.shape
    bm, bn = math.ceil(m / block), math.ceil(n / block)
    pad = torch.zeros(bm * block, bn * block, dtype=torch.float32)
    pad[:m, :n] = w.float()
    blocks = pad.view(bm, block, bn, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    s = amax / FP8_MAX
    if ue8m0:
        s = torch.pow(2.0, torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).view(bm * block, bn * block)[:m, :n].to(torch.float8_e4m3fn)
    return q, s.float()
