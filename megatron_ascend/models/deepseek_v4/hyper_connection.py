"""Manifold-constrained hyper-connections (mHC): DeepSeek-V4's replacement for the residual connection.

The residual is ``n = hc_mult`` streams per token, kept inside the decoder stack as ONE tensor
``streams [s(/tp), b, n*h]`` (stream j = columns ``[j*h, (j+1)*h)``), so pipeline p2p, sequence parallel and
recompute see an ordinary activation (only its width is n*h). Everything here is per token: no communication.

Per sublayer (``attn_hc`` before attention, ``ffn_hc`` before the MoE), with fp32 parameters ``fn [(2+n)*n, n*h]``,
``base [(2+n)*n]``, ``scale [3]`` and x = the token's n*h stream values (transformers' DeepseekV4HyperConnection):

    m    = (x / rms(x)) @ fn^T                                  # unweighted RMS over all n*h values, fp32
    pre  = sigmoid(m[:n] * scale[0] + base[:n]) + hc_eps        # [n]   collapse weights
    post = 2 * sigmoid(m[n:2n] * scale[1] + base[n:2n])         # [n]   expand weights
    comb = sinkhorn(softmax(m[2n:].view(n, n) * scale[2] + base[2n:].view(n, n), -1) + hc_eps)   # [n, n]
    y    = sum_j pre_j * stream_j                               # [h]   the sublayer's input
    new stream_k = post_k * f(norm(y)) + sum_j comb[j, k] * stream_j         (hc_post)

``sinkhorn`` normalises columns once, then (rows, columns) ``hc_sinkhorn_iters - 1`` times, dividing by
``sum + hc_eps`` (so each sum ends within about hc_eps of 1). The head (``hc_head``: ``hc_fn [n, n*h]``,
``hc_base [n]``, ``hc_scale [1]``) only collapses: ``y = sum_j (sigmoid(m_j * hc_scale + hc_base_j) + hc_eps)
* stream_j``.

Dtypes follow the reference: the mixing coefficients are computed in fp32 from the fp32 parameters (they stay
fp32 in bf16 training: ``keep_fp32``); ``post`` / ``comb`` are cast to the stream dtype before mixing; the
collapse is summed in fp32 and cast back.

Tensor parallel: parameters are replicated; under sequence parallel each rank sees its own tokens, so the
parameters carry ``sequence_parallel`` (partial grads, all-reduced over tp by the DDP wrapper, like norms).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...tensor_parallel.sharding import mark_sharded


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] positive -> approximately doubly stochastic (columns normalised last), as transformers does."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _fp32_param(*shape) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=torch.float32))
    p.keep_fp32 = True  # the trainer's bf16 cast leaves it fp32 (transformers keeps mHC in fp32)
    return p


class HyperConnection(nn.Module):
    """``attn_hc`` / ``ffn_hc``: forward(streams [s, b, n*h]) -> (post [s, b, n], comb [s, b, n, n], y [s, b, h])."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 sequence_parallel: bool = False):
        super().__init__()
        self.n, self.h = hc_mult, hidden_size
        self.iters, self.hc_eps, self.norm_eps = sinkhorn_iters, hc_eps, norm_eps
        width = (2 + hc_mult) * hc_mult
        self.fn = _fp32_param(width, hc_mult * hidden_size)
        self.base = _fp32_param(width)
        self.scale = _fp32_param(3)
        for p in (self.fn, self.base, self.scale):
            mark_sharded(p, None, sequence_parallel=sequence_parallel)

    def coefficients(self, streams: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre [.., n], post [.., n], comb [.., n, n]), all fp32."""
        n = self.n
        m = F.linear(_unit_rms(streams.float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = m.split([n, n, n * n], dim=-1)
        base, scale = self.base.float(), self.scale.float()
        pre = torch.sigmoid(pre_w * scale[0] + base[:n]) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * scale[1] + base[n:2 * n])
        comb = comb_w.unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
        comb = sinkhorn(torch.softmax(comb, dim=-1) + self.hc_eps, self.iters, self.hc_eps)
        return pre, post, comb

    def forward(self, streams: torch.Tensor):
        pre, post, comb = self.coefficients(streams)
        return post, comb, collapse(streams, pre)

    def extra_repr(self) -> str:
        return f"hc_mult={self.n}, hidden={self.h}, sinkhorn_iters={self.iters}"


def collapse(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights_j * stream_j: streams [.., n*h], weights [.., n] (fp32) -> [.., h] in the streams' dtype."""
    n = weights.shape[-1]
    x = streams.unflatten(-1, (n, -1))
    return (weights.unsqueeze(-1) * x).sum(dim=-2).to(streams.dtype)


def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """new stream_k = post_k * out + sum_j comb[j, k] * stream_j.  out [.., h], streams [.., n*h] -> [.., n*h]."""
    dtype = streams.dtype
    n = post.shape[-1]
    x = streams.unflatten(-1, (n, -1))                            # [.., n, h]
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), x)     # [.., n, h]: row k = sum_j comb[j, k] x_j
    return (post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed).flatten(-2)


def expand(hidden: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """The embedding [.., h] copied into every stream -> [.., n*h]."""
    return hidden.repeat(*([1] * (hidden.dim() - 1)), hc_mult)


class HyperHead(nn.Module):
    """``model.hc_head`` (and each MTP depth's own): forward(streams [s, b, n*h]) -> [s, b, h]."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float,
                 sequence_parallel: bool = False):
        super().__init__()
        self.n, self.hc_eps, self.norm_eps = hc_mult, hc_eps, norm_eps
        self.hc_fn = _fp32_param(hc_mult, hc_mult * hidden_size)
        self.hc_base = _fp32_param(hc_mult)
        self.hc_scale = _fp32_param(1)
        for p in (self.hc_fn, self.hc_base, self.hc_scale):
            mark_sharded(p, None, sequence_parallel=sequence_parallel)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        m = F.linear(_unit_rms(streams.float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(m * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return collapse(streams, pre)
