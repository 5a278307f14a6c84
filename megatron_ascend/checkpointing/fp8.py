"""DeepSeek FP8 block format (deepseek_architecture.md 5.2 and 6.6): float8_e4m3fn weights with one scale per
``bm x bn`` block (128 x 128 in every release; ``quantization_config.weight_block_size`` says so), scale shape
``[ceil(M/bm), ceil(N/bn)]``; ``W = q.float() * s`` per block, edge blocks cropped.

Scales come in two encodings, both handled here:
  * fp32 (V3 / V3.2 ``weight_scale_inv``; with ``scale_fmt: ue8m0`` the values are powers of two, which
    dequantisation does not need to know);
  * e8m0 (V4 ``.scale``, safetensors ``F8_E8M0`` / ``float8_e8m0fnu``, or raw ``uint8``): an 8-bit biased
    exponent, value ``2 ** (byte - 127)``; byte 255 is NaN. Decoded here with integer arithmetic
    (``decode_e8m0``), not through torch's e8m0 casts.

With power-of-two scales every dequantised value is exact in bf16 (e4m3 has 3 mantissa bits, bf16 has 7),
so the bf16 output equals the fp32 one rounded only where the exponent leaves bf16's range.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

BLOCK = 128
FP8_MAX = 448.0
E8M0_BIAS = 127
E8M0_NAN = 255

Block = Union[int, Sequence[int]]


def block_shape(block: Block) -> Tuple[int, int]:
    b = (block, block) if isinstance(block, int) else tuple(int(x) for x in block)
    if len(b) != 2 or min(b) < 1:
        raise ValueError(f"an FP8 block must be two positive sizes [rows, cols], got {block!r}")
    return b


def decode_e8m0(raw: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes (``float8_e8m0fnu`` or ``uint8``) -> fp32 ``2 ** (byte - 127)``; byte 255 -> NaN."""
    if raw.dtype == torch.float8_e8m0fnu:
        raw = raw.view(torch.uint8)
    if raw.dtype != torch.uint8:
        raise ValueError(f"e8m0 scales must be float8_e8m0fnu or uint8 bytes, got {raw.dtype}")
    e = raw.to(torch.int32) - E8M0_BIAS
    out = torch.ldexp(torch.ones(e.shape, dtype=torch.float32), e)
    return torch.where(raw == E8M0_NAN, torch.full_like(out, float("nan")), out)


def encode_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Positive power-of-two fp32 scales -> ``float8_e8m0fnu`` (exact; anything else is an error)."""
    s = s.float()
    m, e = torch.frexp(s)  # s = m * 2**e with m in [0.5, 1)
    if not bool(((m == 0.5) & (s > 0)).all()):
        raise ValueError("e8m0 holds positive powers of two only; round the scales first (ue8m0)")
    byte = (e.to(torch.int32) - 1 + E8M0_BIAS)
    if int(byte.min()) < 0 or int(byte.max()) > 254:
        raise ValueError("a scale is outside e8m0's range 2**-127 .. 2**127")
    return byte.to(torch.uint8).view(torch.float8_e8m0fnu)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor -> fp32 values, whatever its encoding (fp32 / bf16 / e8m0 / uint8 e8m0)."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return decode_e8m0(scale)
    if scale.dtype.is_floating_point:
        return scale.float()
    raise ValueError(f"a block scale must be a float or e8m0 tensor, got {scale.dtype}")


def expected_scale_shape(shape: Sequence[int], block: Block = BLOCK) -> Tuple[int, int]:
    bm, bn = block_shape(block)
    return (math.ceil(shape[0] / bm), math.ceil(shape[1] / bn))


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype=torch.bfloat16,
                      block: Block = BLOCK) -> torch.Tensor:
    """``q`` [M, N] float8_e4m3fn, ``scale_inv`` [ceil(M/bm), ceil(N/bn)] (fp32 or e8m0) -> [M, N] ``out_dtype``."""
    if q.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(q.shape)}")
    bm, bn = block_shape(block)
    m, n = q.shape
    want = expected_scale_shape((m, n), (bm, bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"FP8 weight of shape {(m, n)} needs a scale of shape {want} "
                         f"({bm}x{bn} blocks), got {tuple(scale_inv.shape)}")
    s = scale_values(scale_inv).repeat_interleave(bn, 1)[:, :n]  # [row blocks, n]
    out = torch.empty((m, n), dtype=out_dtype)
    for i in range(s.shape[0]):  # one row block at a time: temporaries of bm rows, not of the whole weight
        rows = slice(i * bm, min((i + 1) * bm, m))
        out[rows] = q[rows].to(torch.float32) * s[i]
    return out


def quantize_blocks(w: torch.Tensor, block: Block = BLOCK, ue8m0: bool = False,
                    e8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse (for tests, benchmarks and exporting FP8): per block s = amax / 448 (``ue8m0``: the next
    power of two), q = w / s. Edge blocks are zero-padded for the amax, then cropped. ``e8m0=True`` (implies
    ue8m0) returns the scales as ``float8_e8m0fnu`` as V4 stores them; otherwise fp32."""
    ue8m0 = ue8m0 or e8m0
    bm_, bn_ = block_shape(block)
    m, n = w.shape
    bm, bn = math.ceil(m / bm_), math.ceil(n / bn_)
    pad = torch.zeros(bm * bm_, bn * bn_, dtype=torch.float32)
    pad[:m, :n] = w.float()
    blocks = pad.view(bm, bm_, bn, bn_)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    s = amax / FP8_MAX
    if ue8m0:
        s = torch.pow(2.0, torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).view(bm * bm_, bn * bn_)[:m, :n].to(torch.float8_e4m3fn)
    return q, (encode_e8m0(s) if e8m0 else s.float())
