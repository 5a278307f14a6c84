"""DeepSeek-V4 FP4 expert format (deepseek_architecture.md 6.4 / 6.6): e2m1 values packed two per byte, one
e8m0 scale per 1 x 32 block along the input dim.

Storage, as DeepSeek's V4 release writes it (and as its ``inference/convert.py`` reads it):
  * weight ``[out, in // 2]`` int8 (safetensors ``I8``; ``U8`` and ``F4`` / ``float4_e2m1fn_x2`` are accepted
    too): byte ``[r, j]`` holds element ``[r, 2j]`` in its **low** nibble and ``[r, 2j + 1]`` in its high nibble;
  * scale ``[out, in // 32]`` e8m0 (``F8_E8M0``), value ``2 ** (byte - 127)`` (fp8.decode_e8m0);
  * ``W[r, c] = e2m1(nibble) * scale[r, c // 32]``.

e2m1 nibble ``sxxm``: sign bit 3, exponent bits 2-1, mantissa bit 0; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Every dequantised value is exact in bf16.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .fp8 import encode_e8m0, scale_values

BLOCK = 32
FP4_MAX = 6.0
# magnitudes of codes 0..7; codes 8..15 are the same with the sign bit set
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(list(_MAGNITUDES) + [-v for v in _MAGNITUDES], dtype=torch.float32)

_BYTES = torch.arange(256)
_PAIRS = torch.stack((E2M1_VALUES[_BYTES & 0x0F], E2M1_VALUES[_BYTES >> 4]), dim=-1)  # byte -> (low, high) values
PACKED_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` packed bytes -> ``[..., 2n]`` fp32 (low nibble first). One byte-indexed lookup: the only
    temporary is an int32 copy of the bytes."""
    if packed.dtype not in PACKED_DTYPES:
        raise ValueError(f"packed FP4 must be int8 / uint8 / float4_e2m1fn_x2, got {packed.dtype}")
    return _PAIRS[packed.view(torch.uint8).to(torch.int32)].flatten(-2)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` nibble codes (0..15) -> ``[..., n]`` int8 bytes (low nibble first)."""
    c = codes.to(torch.int32)
    if c.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of elements per row")
    byte = (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)
    return byte.view(torch.int8)


def expected_scale_shape(shape: Tuple[int, int], block: int = BLOCK) -> Tuple[int, int]:
    """Logical weight shape [out, in] -> its scale shape [out, in // block]."""
    return (shape[0], shape[1] // block)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, out_dtype=torch.bfloat16,
                   block: int = BLOCK) -> torch.Tensor:
    """``packed`` [out, in // 2] + ``scale`` [out, in // block] (e8m0 or float) -> [out, in] ``out_dtype``."""
    if packed.dim() != 2:
        raise ValueError(f"FP4 weight must be 2-D, got shape {tuple(packed.shape)}")
    out, half = packed.shape
    n = 2 * half
    if n % block:
        raise ValueError(f"FP4 weight has {n} input columns, not a multiple of its {block}-wide scale blocks")
    want = expected_scale_shape((out, n), block)
    if tuple(scale.shape) != want:
        raise ValueError(f"FP4 weight of shape {(out, n)} (stored {(out, half)}) needs a scale of shape {want} "
                         f"(1x{block} blocks), got {tuple(scale.shape)}")
    v = unpack_e2m1(packed).view(out, n // block, block)
    v.mul_(scale_values(scale)[:, :, None])
    return v.view(out, n).to(out_dtype)


def quantize_fp4(w: torch.Tensor, block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse (for tests and benchmarks): per 1 x ``block`` block the power-of-two scale s with
    amax / s <= 6, each value rounded to the nearest e2m1 magnitude. Returns (int8 [out, in // 2],
    float8_e8m0fnu [out, in // block])."""
    out, n = w.shape
    if n % block:
        raise ValueError(f"FP4 quantisation needs the input dim ({n}) to be a multiple of {block}")
    blocks = w.float().view(out, n // block, block)
    amax = blocks.abs().amax(-1).clamp(min=2.0 ** -120)
    s = torch.pow(2.0, torch.ceil(torch.log2(amax / FP4_MAX)))
    x = blocks / s[:, :, None]
    mags = E2M1_VALUES[:8]
    idx = (x.abs()[..., None] - mags).abs().argmin(-1)  # nearest magnitude code 0..7
    codes = idx + 8 * ((x < 0) & (idx > 0)).to(idx.dtype)
    return pack_e2m1(codes.view(out, n)), encode_e8m0(s)
