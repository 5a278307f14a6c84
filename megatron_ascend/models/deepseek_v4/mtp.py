"""DeepSeek-V4 Multi-Token Prediction block, one per depth k = 1..D (DeepSeek's V4 inference ``MTPBlock``;
transformers' DeepseekV4ForCausalLM does not build MTP and ignores ``mtp.*`` tensors).

    x_k      = e_proj(enorm(Emb(ids shifted by k))) (copied into every stream) + h_proj(hnorm(streams_{k-1}))
    streams_k = DeepseekV4DecoderLayer(x_k)                      (global layer index num_hidden_layers + k - 1)
    logits_k = lm_head(norm(hc_head(streams_k)))                 -> predicts token i + k + 1

``hnorm`` and ``h_proj`` act on each stream on its own (the reference applies them to [b, s, n, h]). Embedding and
``lm_head`` are the main model's; ``norm`` and ``hc_head`` are the block's own. streams_0 is the main model's
last decoder output (before its hc_head); depth k+1 reads depth k's streams (DeepSeek ships D = 1, where the
two readings agree; chaining the streams is our choice for D > 1, as V3 chains hidden states).

Names: ``mtp.layers.{k-1}.{self_attn,mlp,attn_hc,ffn_hc,input_layernorm,post_attention_layernorm}.*`` (the
decoder layer's) and ``mtp.layers.{k-1}.{e_proj,h_proj,enorm,hnorm,norm}.weight``,
``mtp.layers.{k-1}.hc_head.{hc_fn,hc_base,hc_scale}``. e_proj / h_proj are replicated over TP and run on this
rank's tokens (marked ``sequence_parallel`` under SP).
"""
from __future__ import annotations

import torch

from ...config import ModelConfig, ParallelConfig
from ...tensor_parallel import wgrad
from ...tensor_parallel.sharding import mark_sharded
from .hyper_connection import HyperHead
from .layer import DeepseekV4DecoderLayer
from .norm import V4RMSNorm


class DeepseekV4MTPLayer(DeepseekV4DecoderLayer):
    def __init__(self, config: ModelConfig, parallel: ParallelConfig, groups=None, depth_index: int = 0):
        super().__init__(config, parallel, groups, config.num_hidden_layers + depth_index)
        sp = parallel.sequence_parallel and parallel.tp > 1
        h, eps = config.hidden_size, config.rms_norm_eps
        self.hc_mult = config.hc_mult
        self.e_proj = wgrad.Linear(h, h, bias=False)
        self.h_proj = wgrad.Linear(h, h, bias=False)
        for lin in (self.e_proj, self.h_proj):
            mark_sharded(lin.weight, None, sequence_parallel=sp)
        self.enorm = V4RMSNorm(h, eps, sequence_parallel=sp)
        self.hnorm = V4RMSNorm(h, eps, sequence_parallel=sp)
        self.norm = V4RMSNorm(h, eps, sequence_parallel=sp)
        self.hc_head = HyperHead(h, config.hc_mult, config.hc_eps, eps, sequence_parallel=sp)

    def forward(self, emb: torch.Tensor, prev: torch.Tensor, rope, position_ids, input_ids):
        """emb [s(/tp), b, h], prev [s(/tp), b, n*h] -> (streams [s(/tp), b, n*h] for the next depth, the head's
        input [s(/tp), b, h], detached indexer loss or None)."""
        e = self.e_proj(self.enorm(emb))                                   # [s, b, h]
        p = self.h_proj(self.hnorm(prev.unflatten(-1, (self.hc_mult, -1))))  # [s, b, n, h]
        x = (e.unsqueeze(-2) + p).flatten(-2)
        x, idx_loss = DeepseekV4DecoderLayer.forward(self, x, rope, position_ids, input_ids)
        return x, self.norm(self.hc_head(x)), idx_loss
