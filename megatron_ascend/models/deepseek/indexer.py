"""DeepSeek-V3.2 DSA lightning indexer (deepseek_architecture.md 1.4) and its KL training loss.

    q = wq_b(c_q) -> [s, b, n_i, D];  k = k_norm(wk(x)) -> [s, b, D] (one key shared by the heads)
    RoPE (half-split, NOT interleaved) on the FIRST rope dims of q and k
    I[t, u] = sum_h w[t, h] * ReLU(q[t, h] . k[u] * D^-0.5),  w = weights_proj(x) * n_i^-0.5
    selected = top-k(I + causal/segment mask)  ->  main attention attends only to selected keys

The indexer's inputs (x, c_q) are detached: it learns only from
``L_I = mean_t KL(p_t || softmax(I_t over selected))``, where p_t is the main attention (detached) summed over
heads and L1-normalised. The Hadamard rotation and FP8 quantisation of the reference kernels are inference
details (the Hadamard transform preserves dot products) and are not applied, as in ``transformers``.

TP: heads are split (wq_b and weights_proj column-parallel); the partial index scores are all-reduced so every
rank selects the same keys. The scores are materialised as [b, s, n_i/tp, s] (a fused NPU kernel is the way
to long sequences; this is the reference path).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import ModelConfig
from ...tensor_parallel import mappings as M
from ...tensor_parallel.layers import ColumnParallelLinear, tp_info
from ...tensor_parallel.sharding import mark_sharded
from ...tensor_parallel import wgrad
from .rope import apply_rope_half


class DSAIndexer(nn.Module):
    def __init__(self, config: ModelConfig, groups=None, layer_idx: int = 0):
        super().__init__()
        c = config
        self.group, _, tp = tp_info(groups)
        self.n_heads, self.head_dim, self.rope_dim = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
        self.topk = c.index_topk
        self.n_local = c.index_n_heads // tp
        self.wq_b = ColumnParallelLinear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, groups,
                                         skip_input_comm=True)
        self.wk = wgrad.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = ColumnParallelLinear(c.hidden_size, c.index_n_heads, groups, skip_input_comm=True)
        for p in list(self.wk.parameters()) + list(self.k_norm.parameters()):
            mark_sharded(p, None)
        self.softmax_scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor):
        """x [s, b, h], c_q [s, b, q_lora] (full sequence, detached); allowed bool [b, s, s].
        Returns (index scores [b, s, s] fp32 with grad to the indexer weights, selected bool [b, s, s])."""
        s, b = x.shape[0], x.shape[1]
        r = self.rope_dim
        q = self.wq_b(c_q).view(s, b, self.n_local, self.head_dim)
        q = torch.cat([apply_rope_half(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = self.k_norm(self.wk(x))
        k = torch.cat([apply_rope_half(k[..., :r], cos[:, :, 0], sin[:, :, 0]), k[..., r:]], dim=-1)
        k = M.copy_to_tensor_model_parallel_region(k, self.group)  # all local heads read the shared key
        qb = q.permute(1, 0, 2, 3).float()                    # [b, s, n, D]
        kb = k.permute(1, 2, 0).float().unsqueeze(1)          # [b, 1, D, s]
        scores = torch.relu(torch.matmul(qb, kb) * self.softmax_scale)  # [b, s, n, s]
        w = self.weights_proj(x).permute(1, 0, 2).float() * (self.n_heads ** -0.5)  # [b, s, n]
        index = torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)  # [b, s, s] (partial over heads)
        index = M.reduce_from_tensor_model_parallel_region(index, self.group)
        with torch.no_grad():
            k_sel = min(self.topk, s)
            top = index.detach().masked_fill(~allowed, float("-inf")).topk(k_sel, dim=-1).indices
            selected = torch.zeros_like(allowed).scatter_(-1, top, True) & allowed
        return index, selected

    @staticmethod
    def kl_loss(p_heads: torch.Tensor, index: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """mean over tokens of KL(p || softmax(index over selected)); p_heads [b, s, s] = main attention
        summed over heads (detached), L1-normalised here."""
        p = p_heads / p_heads.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = index.masked_fill(~selected, float("-inf")).log_softmax(-1)
        pos = p > 0
        kl = torch.where(pos, p * (torch.log(p.clamp_min(1e-30)) - logq.masked_fill(~pos, 0.0)),
                         torch.zeros_like(p))
        return kl.sum(-1).mean()
