"""DeepSeek-V4 KV compressor: gated pooling of ``ratio`` consecutive tokens into one compressed KV entry.

For a window w of ``m = ratio`` tokens with projections ``C = kv_proj(x)``, ``Z = gate_proj(x)``:

    HCA (no overlap):  entry_w = kv_norm( sum_j softmax_j(Z_j + position_bias_j) * C_j )   over the m tokens
    CSA (overlap):     C, Z have 2 * head_dim channels per token, [Ca | Cb]; entry w pools Ca of window w-1
                       and Cb of window w over 2m slots (width 2m, stride m); window 0's first half is empty
                       (zero value, -inf gate)

The softmax is per channel over the slots, in fp32. The entry is then rotated (RoPE "compress" table) on its
last ``qk_rope_head_dim`` channels at position ``w * m``. Only complete windows are emitted: ``s // m`` entries.
Query ``t`` may use entry ``w`` iff ``w < (position_t + 1) // m`` (the window lies wholly in its past); the
attention applies that rule (``visible_entries``).

Parameter names follow transformers: ``kv_proj``, ``gate_proj``, ``position_bias`` ([m, c * head_dim], fp32),
``kv_norm`` (weighted RMSNorm of head_dim). The CSA compressor also owns the lightning ``indexer`` (indexer.py),
as in transformers (``self_attn.compressor.indexer.*``).

Parallel placement: the projections are replicated linears on this rank's tokens (their outputs travel with
the attention's latents through one all-gather / copy); the pooling runs on the full sequence on every TP rank.
The caller marks which parameters get partial gradients (see attention.py).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn as nn

from ...tensor_parallel import wgrad
from ...tensor_parallel.sharding import mark_sharded
from ..deepseek.norm import RMSNorm
from .rope import apply_partial_rope

def replicated_linear(i: int, o: int, sequence_parallel: bool) -> nn.Linear:
    lin = wgrad.Linear(i, o, bias=False)
    mark_sharded(lin.weight, None, sequence_parallel=sequence_parallel)
    return lin


def visible_entries(position_ids: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """bool [b, s, n_entries]: query t may use compressed entry w iff w < (position_t + 1) // ratio."""
    w = torch.arange(n_entries, device=position_ids.device)
    return w.view(1, 1, -1) < ((position_ids + 1) // ratio).unsqueeze(-1)


def pool_entries(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, kv_norm: nn.Module, ratio: int,
                 head_dim: int, overlap: bool, tables_at: Callable) -> torch.Tensor:
    """kv, gate [s, b, c * head_dim] (full sequence) -> compressed entries [b, s // ratio, head_dim], normed and
    rotated. ``tables_at(positions [b, n])`` gives the cos / sin ``[n, b, 1, r/2]`` of the entries."""
    s, b = kv.shape[0], kv.shape[1]
    m, d = ratio, head_dim
    n = s // m
    if n == 0:
        return kv.new_zeros(b, 0, d)
    # [n * m, b, c*d] -> [b, n, m, c*d]
    kv = kv[: n * m].view(n, m, b, -1).permute(2, 0, 1, 3)
    gate = gate[: n * m].view(n, m, b, -1).permute(2, 0, 1, 3) + position_bias
    if overlap:
        kv = _overlap(kv, d, 0.0)
        gate = _overlap(gate, d, float("-inf"))
    else:  # the product keeps kv for backward: a copy, not a view that would pin the caller's whole latent
        kv = kv.contiguous()
    w = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    entries = kv_norm((kv * w).sum(dim=2))  # [b, n, d]
    pos = (torch.arange(n, device=kv.device) * m).unsqueeze(0).expand(b, n)
    cos, sin = tables_at(pos)  # [n, b, 1, r/2]
    return apply_partial_rope(entries, cos[:, :, 0].transpose(0, 1), sin[:, :, 0].transpose(0, 1))


def _overlap(t: torch.Tensor, d: int, fill: float) -> torch.Tensor:
    """[b, n, m, 2d] -> [b, n, 2m, d]: slots 0..m-1 hold window w-1's first half (Ca), m..2m-1 window w's second
    half (Cb); window 0's first m slots are ``fill``."""
    pad = t.new_full((t.shape[0], 1, t.shape[2], d), fill)
    return torch.cat([torch.cat([pad, t[:, :-1, :, :d]], dim=1), t[..., d:]], dim=2)


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int, ratio: int, overlap: bool, eps: float,
                 sequence_parallel: bool = False, partial_grads: bool = False):
        """``sequence_parallel``: the projections see only this rank's tokens (their grads are partial over
        TP); ``partial_grads``: the pooling parameters (position_bias, kv_norm) get per-rank partial grads
        (their output feeds this rank's heads only), so they are marked for the TP all-reduce too."""
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.width = (2 if overlap else 1) * head_dim
        self.kv_proj = replicated_linear(hidden_size, self.width, sequence_parallel)
        self.gate_proj = replicated_linear(hidden_size, self.width, sequence_parallel)
        self.position_bias = nn.Parameter(torch.zeros(ratio, self.width, dtype=torch.float32))
        mark_sharded(self.position_bias, None, sequence_parallel=partial_grads)
        self.kv_norm = RMSNorm(head_dim, eps, sequence_parallel=partial_grads)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [s', b, h] -> (values, gates), each [s', b, c * head_dim]."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, tables_at: Callable) -> torch.Tensor:
        return pool_entries(kv, gate, self.position_bias, self.kv_norm, self.ratio, self.head_dim, self.overlap,
                            tables_at)
