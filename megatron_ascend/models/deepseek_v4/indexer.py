"""DeepSeek-V4 lightning indexer (CSA layers): picks ``index_topk`` compressed entries per query, and its KL loss.

    K = its own overlapping compressor at ``index_head_dim`` (compressor.py), rotated at positions w * m
    q = q_b_proj(c_q) -> [s, b, n_i, D_i], RoPE ("compress" table) on the last rope dims at the query positions
    I[t, w] = sum_h weights_proj(x)[t, h] * n_i^-0.5 * ReLU(q[t, h] . K[w]) * D_i^-0.5
    selected = top-k(I over the entries visible to t)          (entries not visible are never selected)

As in transformers, no Hadamard rotation and no FP4 / FP8 quantisation-aware simulation (DeepSeek's inference
code applies both; the rotation preserves dot products, the quantisation is an inference / QAT detail).

Training (an option, ``dsa_indexer_loss_coeff > 0``): the indexer sees detached inputs (x, c_q) and learns only
from ``L_I = mean over queries with >= 1 selected entry of KL(p_t || softmax(I_t over the selected entries))``,
where p_t is the main attention's probability mass on each selected compressed entry (sink and window in its
denominator), summed over heads and L1-normalised: V3.2's recipe (models/deepseek/indexer.py) restricted to
the compressed entries (Megatron-LM's sparse indexer loss for V4). Without the loss the indexer runs under
no_grad (top-k has no gradient; transformers' indexer weights get none either).

TP: q_b_proj and weights_proj are column-parallel over the indexer heads; the partial scores are all-reduced so
every rank selects the same entries. The compressor runs on the full (gathered, detached) sequence on every
rank; its keys enter the TP region through copy_to (backward all-reduce), so its grads are complete. Scores are
materialised as ``[b, s, n_i/tp, s/m]`` (the reference path; a fused kernel is the way to long sequences).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ...config import ModelConfig
from ...tensor_parallel import mappings as M
from ...tensor_parallel.layers import ColumnParallelLinear, tp_info
from ..deepseek.norm import RMSNorm
from .compressor import pool_entries, replicated_linear
from .rope import apply_partial_rope


class _Scorer(nn.Module):
    """Holds ``weights_proj`` (transformers' ``indexer.scorer.weights_proj``)."""

    def __init__(self, config: ModelConfig, groups):
        super().__init__()
        self.weights_proj = ColumnParallelLinear(config.hidden_size, config.index_n_heads, groups,
                                                 skip_input_comm=True)


class V4Indexer(nn.Module):
    def __init__(self, config: ModelConfig, groups=None, ratio: int = 4):
        super().__init__()
        c = config
        self.group, _, tp = tp_info(groups)
        self.n_heads, self.head_dim, self.topk, self.ratio = c.index_n_heads, c.index_head_dim, c.index_topk, ratio
        self.n_local = c.index_n_heads // tp
        # its own overlapping compressor at index_head_dim (transformers names these on the indexer itself); it
        # runs on the full detached sequence on every rank, so its grads are complete: nothing to mark
        w = 2 * c.index_head_dim
        self.kv_proj = replicated_linear(c.hidden_size, w, False)
        self.gate_proj = replicated_linear(c.hidden_size, w, False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, w, dtype=torch.float32))
        self.kv_norm = RMSNorm(c.index_head_dim, c.rms_norm_eps)
        self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, groups,
                                             skip_input_comm=True)
        self.scorer = _Scorer(c, groups)

    def scores(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               tables_at: Callable) -> torch.Tensor:
        """x [s, b, h], c_q [s, b, q_lora] (full sequence, detached); cos / sin: the "compress" tables of the
        queries [s, b, 1, r/2]. Returns the index scores [b, s, s // m] fp32 (complete over heads)."""
        s, b = x.shape[0], x.shape[1]
        k = pool_entries(self.kv_proj(x), self.gate_proj(x), self.position_bias, self.kv_norm, self.ratio,
                         self.head_dim, True, tables_at)                  # [b, n, D]
        k = M.copy_to_tensor_model_parallel_region(k, self.group)         # every local head reads the keys
        q = apply_partial_rope(self.q_b_proj(c_q).view(s, b, self.n_local, self.head_dim), cos, sin)
        qb = q.permute(1, 0, 2, 3).float().reshape(b, s * self.n_local, self.head_dim)  # [b, s * n_l, D]
        # one batched matmul per sequence: broadcasting the keys over the queries ([b, 1, D, n] against
        # [b, s, n_l, D]) made torch.matmul copy them per query for backward at b > 1 (s x the keys' bytes)
        sc = torch.bmm(qb, k.float().transpose(1, 2)).view(b, s, self.n_local, -1)
        sc = torch.relu(sc * self.head_dim ** -0.5)                       # [b, s, n_l, n]
        w = self.scorer.weights_proj(x).permute(1, 0, 2).float() * self.n_heads ** -0.5  # [b, s, n_l]
        index = torch.matmul(w.unsqueeze(-2), sc).squeeze(-2)            # [b, s, n] (partial over heads)
        return M.reduce_from_tensor_model_parallel_region(index, self.group)

    def select(self, index: torch.Tensor, visible: torch.Tensor):
        """The top-``index_topk`` visible entries of each query (all of them when fewer are visible; an entry that
        is not visible is never selected): (long [b, s, k] entry indices, -1 for none; bool [b, s, n])."""
        n = index.shape[-1]
        with torch.no_grad():
            if n == 0:
                return index.new_zeros(index.shape, dtype=torch.long), visible
            top = index.detach().masked_fill(~visible, float("-inf")).topk(min(self.topk, n), dim=-1).indices
            ok = visible.gather(-1, top)
            return top.masked_fill(~ok, -1), torch.zeros_like(visible).scatter_(-1, top, ok)

    @staticmethod
    def kl_loss(p_heads: torch.Tensor, index: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Mean over the queries with at least one selected entry of KL(p || softmax(index over selected));
        ``p_heads [b, s, n]``: the main attention mass on each entry summed over all heads (detached)."""
        rows = selected.any(-1)
        p, idx, sel = p_heads[rows], index[rows], selected[rows]
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = idx.masked_fill(~sel, float("-inf")).log_softmax(-1)
        pos = p > 0
        kl = torch.where(pos, p * (torch.log(p.clamp_min(1e-30)) - logq.masked_fill(~pos, 0.0)),
                         torch.zeros_like(p))
        return kl.sum(-1).sum() / max(int(rows.sum()), 1)
