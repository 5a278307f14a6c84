"""DeepSeek-V4 decoder layer: attention and MoE between mHC stream mixings (transformers' DeepseekV4DecoderLayer).

    post, comb, y = attn_hc(streams);  streams = hc_post(self_attn(input_layernorm(y)), streams, post, comb)
    post, comb, y = ffn_hc(streams);   streams = hc_post(mlp(post_attention_layernorm(y)), streams, post, comb)

``streams [s(/tp), b, hc_mult * h]`` in and out (hyper_connection.py). ``self_attn`` is
``models/deepseek_v4/attention.py: DeepseekV4Attention(config, parallel, groups, layer_idx)``, called as
``self_attn(x [s(/tp), b, h], rope, position_ids [b, s]) -> (out [s(/tp), b, h], indexer loss or None)``; the
model builds ``rope`` once per forward (rope.py: V4Rope). ``mlp`` is megatron_ascend.moe.MoELayer (V4: every
layer is MoE; sqrt-softplus scores, the first ``num_hash_layers`` layers hash-routed through the frozen
``mlp.gate.tid2eid`` buffer, SwiGLU clamped at ``swiglu_limit`` in routed and shared experts).

An indexer loss (CSA layers, when the attention computes one) is attached to the graph like the V3.2 one
(``dsa_indexer_loss_coeff`` x the aux-loss scale, moe.set_aux_loss_scale) and returned detached for logging.

Selective recompute (``recompute_modules``, set by megatron_ascend.recompute): ``layernorm`` (the two pre-norm
outputs are not kept), ``moe`` (the whole MoE block is one checkpoint), ``mhc`` (the mixing coefficients are
recomputed from the streams, which are kept anyway: drops the fp32 normalised copy of the n*h streams each mixing
keeps for its projection); ``moe_act`` / ``shared_experts`` act inside the MoE block, ``core_attn`` inside the
attention when it lists it in ``supports_recompute``.
"""
from __future__ import annotations

import torch

from ...config import ModelConfig, ParallelConfig
from ...moe.load_balancing import attach_aux_loss
from ...tensor_parallel.random import checkpoint, checkpoint_discard_output
from ..chunk import DecoderLayerBase
from .hyper_connection import HyperConnection, collapse, hc_post
from .norm import V4RMSNorm


def build_attention(config: ModelConfig, parallel: ParallelConfig, groups, layer_idx: int):
    """The attention of layer ``layer_idx`` (imported here so that the attention module is one pluggable part)."""
    from .attention import DeepseekV4Attention
    return DeepseekV4Attention(config, parallel, groups, layer_idx)


class DeepseekV4DecoderLayer(DecoderLayerBase):
    layer_recompute = ("layernorm", "moe", "mhc")
    is_moe = True

    def __init__(self, config: ModelConfig, parallel: ParallelConfig, groups=None, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        sp = parallel.sequence_parallel and parallel.tp > 1
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = build_attention(config, parallel, groups, layer_idx)
        from ...moe import MoELayer  # moe imports nothing from models; imported here to keep start-up light
        self.mlp = MoELayer(config, parallel, groups, layer_idx, init=False)  # the model draws every weight by name
        self.input_layernorm = V4RMSNorm(h, eps, sequence_parallel=sp)
        self.post_attention_layernorm = V4RMSNorm(h, eps, sequence_parallel=sp)
        self.attn_hc = HyperConnection(h, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps, sp)
        self.ffn_hc = HyperConnection(h, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps, sp)
        self.indexer_loss_coeff = config.dsa_indexer_loss_coeff
        self.recompute_modules = frozenset()

    def _mix(self, hc: HyperConnection, streams: torch.Tensor):
        """(post, comb, collapsed input of the sublayer)."""
        if "mhc" in self.recompute_modules and torch.is_grad_enabled():
            pre, post, comb = checkpoint(hc.coefficients, streams)
            return post, comb, collapse(streams, pre)
        return hc(streams)

    def _norm_then(self, norm, x, consumer):
        """consumer(norm(x)); with selective 'layernorm' recompute the norm output is not kept (recomputed)."""
        if "layernorm" in self.recompute_modules:
            return checkpoint_discard_output(norm, x, consumer)
        return consumer(norm(x))

    def _moe(self, x, input_ids):
        if "moe" in self.recompute_modules:
            return checkpoint(lambda t: self.mlp(t, input_ids=input_ids), x)
        return self.mlp(x, input_ids=input_ids)

    def forward(self, streams: torch.Tensor, rope, position_ids: torch.Tensor, input_ids=None):
        """Returns (streams [s(/tp), b, n*h], detached indexer loss or None)."""
        post, comb, x = self._mix(self.attn_hc, streams)
        attn, idx_loss = self._norm_then(self.input_layernorm, x,
                                         lambda y: self.self_attn(y, rope, position_ids))
        streams = hc_post(attn, streams, post, comb)
        if idx_loss is not None:
            if self.indexer_loss_coeff:  # gradient scaled by the one aux-loss scale (moe.set_aux_loss_scale)
                streams = attach_aux_loss(streams, self.indexer_loss_coeff * idx_loss)
            idx_loss = idx_loss.detach()
        post, comb, x = self._mix(self.ffn_hc, streams)
        out = self._norm_then(self.post_attention_layernorm, x, lambda y: self._moe(y, input_ids))
        return hc_post(out, streams, post, comb), idx_loss
