"""Rotary position embedding for MLA (interleaved pairs) and the DSA indexer (half-split), with YaRN.

Follows deepseek_architecture.md 1.3 and, where the two differ, what ``transformers`` does (the parity
oracle): the cos/sin "attention factor" is mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
both are set (1.0 for the released configs), else mscale(factor); the softmax scale is
``qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2`` when mscale_all_dim is set. YaRN is applied
whenever ``config.rope_scaling`` is set (the DeepSeek reference applies it only beyond 4K context; pass a
config without rope_scaling for plain-RoPE pre-training).

Tables are ``cos, sin: [s, b, 1, rope_dim/2]`` (fp32) built from ``position_ids [b, s]`` once per forward.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ...config import ModelConfig
from ...platform import kernels


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(config: ModelConfig) -> Tuple[torch.Tensor, float]:
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = rs.factor
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = float(yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim))
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(rot):
        return (dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: divide by factor
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    return inv_inter * (1 - extrapolation) + inv_extra * extrapolation, attention_factor


def softmax_scale(config: ModelConfig) -> float:
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryTables:
    """Builds cos / sin tables for given position ids (inv_freq cached per device)."""

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.attention_factor = inv_freq_and_attention_factor(config)

    def __call__(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq.to(position_ids.device)
        freqs = position_ids.t()[..., None].float() * inv  # [s, b, d/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.unsqueeze(2), sin.unsqueeze(2)  # [s, b, 1, d/2]


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           attention_factor: float = 1.0) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) by angle i (DeepSeek MLA layout); output keeps the pair layout.
    x: [s, b, n, d]; cos/sin: [s, b, 1, d/2] (``attention_factor``: the YaRN factor they include). The kernel
    table's ``rope_interleaved`` (torch_npu's npu_rotary_mul on Ascend), whose reference is below."""
    return kernels.get("rope_interleaved")(x, cos, sin, attention_factor)


@kernels.reference("rope_interleaved")
def rope_interleaved_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             attention_factor: float = 1.0) -> torch.Tensor:
    """One complex multiply of the pairs viewed as complex numbers by ``cos + i sin`` (fp32, like the reference
    below, which it equals bitwise on CPU: the products and the sum / difference are the same fp32 ops), so
    forward and backward are one elementwise op each instead of four multiplies, two adds and a stack."""
    dtype = x.dtype
    xf = x.float()
    xc = torch.view_as_complex(xf.reshape(*xf.shape[:-1], -1, 2).contiguous())
    out = torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2)
    return out.to(dtype)


def apply_rope_interleaved_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The plain form of ``apply_rope_interleaved`` (the oracle tests compare it with)."""
    dtype = x.dtype
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return out.to(dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (rotate_half) RoPE, as the V3.2 indexer uses. x: [..., d]; cos/sin: [..., d/2]."""
    dtype = x.dtype
    xf = x.float()
    h = xf.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
