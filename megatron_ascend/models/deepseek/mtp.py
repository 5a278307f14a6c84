"""Multi-Token Prediction module (deepseek_architecture.md 3), one per depth k = 1..D.

    h'_k = eh_proj(cat[enorm(Emb(ids shifted by k)), hnorm(h_{k-1})])   (code order: [emb ; hidden])
    h_k  = DecoderLayer(h'_k);  logits_k = lm_head(shared_head.norm(h_k))  -> predicts token i+k+1

Embedding and output head are the main model's. h_0 is the main model's post-final-norm hidden; depth k+1
reads the post-``shared_head.norm`` hidden of depth k (as ``transformers``' MtpModel does). The block is a full
decoder layer with global layer index ``num_hidden_layers + k - 1`` (MoE in V3), registered as
``mtp.layers.{k-1}.{self_attn,mlp,input_layernorm,...}`` next to ``enorm / hnorm / eh_proj /
shared_head.norm`` -- the HF on-disk layer ``model.layers.{L+k-1}`` minus its duplicated embed/head.
eh_proj is replicated over TP and runs on this rank's tokens (``[s(/tp), b, 2h] -> [s(/tp), b, h]``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...config import ModelConfig, ParallelConfig
from ...tensor_parallel.sharding import mark_sharded
from ...tensor_parallel import wgrad
from .layer import DecoderLayer
from .norm import RMSNorm


class _SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float, sp: bool):
        super().__init__()
        self.norm = RMSNorm(hidden, eps, sequence_parallel=sp)


class MTPLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, parallel: ParallelConfig, groups=None, depth_index: int = 0):
        super().__init__(config, parallel, groups, config.num_hidden_layers + depth_index)
        sp = parallel.sequence_parallel and parallel.tp > 1
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(h, eps, sequence_parallel=sp)
        self.hnorm = RMSNorm(h, eps, sequence_parallel=sp)
        self.eh_proj = wgrad.Linear(2 * h, h, bias=False)
        mark_sharded(self.eh_proj.weight, None, sequence_parallel=sp)
        self.shared_head = _SharedHead(h, eps, sp)

    def forward(self, emb: torch.Tensor, prev: torch.Tensor, cos, sin, mask, input_ids):
        """emb, prev [s(/tp), b, h] -> (normed hidden [s(/tp), b, h] for the head and the next depth,
        detached indexer loss or None)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(prev)], dim=-1))
        x, idx_loss = DecoderLayer.forward(self, x, cos, sin, mask, input_ids)
        return self.shared_head.norm(x), idx_loss
