"""DeepSeek decoder layer: pre-norm residual block with MLA and a dense SwiGLU MLP or the MoE block.

    h = h + self_attn(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))

``hidden [s(/tp), b, h]`` in and out. The MoE block is ``megatron_ascend.moe.MoELayer`` (imported when a
MoE layer is built). The DSA indexer's KL loss is attached to the graph (``moe.load_balancing.attach_aux_loss``,
scaled like the MoE aux losses by ``moe.set_aux_loss_scale``) so its gradient flows from any pipeline stage;
the layer also returns the detached value for logging.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...config import ModelConfig, ParallelConfig
from ...moe.load_balancing import attach_aux_loss
from ...tensor_parallel.random import checkpoint, checkpoint_discard_output
from ..chunk import DecoderLayerBase
from .attention import MLAttention
from .mlp import DenseMLP
from .norm import RMSNorm


class DecoderLayer(DecoderLayerBase):
    layer_recompute = ("layernorm", "mlp", "moe")

    def __init__(self, config: ModelConfig, parallel: ParallelConfig, groups=None, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        sp = parallel.sequence_parallel and parallel.tp > 1
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, sequence_parallel=sp)
        self.self_attn = MLAttention(config, groups, sp, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, sequence_parallel=sp)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            from ...moe import MoELayer  # moe imports nothing from models; imported here to keep start-up light
            self.mlp = MoELayer(config, parallel, groups, layer_idx, init=False)  # the model draws every weight by name
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, groups, sp, config.swiglu_limit)
        self.indexer_loss_coeff = config.dsa_indexer_loss_coeff
        self.recompute_modules = frozenset()

    def _norm_then(self, norm, x, consumer):
        """consumer(norm(x)); with selective 'layernorm' recompute the norm output is not kept (recomputed)."""
        if "layernorm" in self.recompute_modules:
            return checkpoint_discard_output(norm, x, consumer)
        return consumer(norm(x))

    def _mlp(self, x, input_ids):
        name = "moe" if self.is_moe else "mlp"
        call = (lambda t: self.mlp(t, input_ids=input_ids)) if self.is_moe else self.mlp
        if name in self.recompute_modules:
            return checkpoint(call, x)
        return call(x)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None):
        """Returns (hidden [s(/tp), b, h], detached indexer loss or None)."""
        attn, idx_loss = self._norm_then(self.input_layernorm, hidden, lambda y: self.self_attn(y, cos, sin, mask))
        hidden = hidden + attn
        if idx_loss is not None:
            if self.indexer_loss_coeff:  # gradient scaled by the one aux-loss scale (moe.set_aux_loss_scale)
                hidden = attach_aux_loss(hidden, self.indexer_loss_coeff * idx_loss)
            idx_loss = idx_loss.detach()
        hidden = hidden + self._norm_then(self.post_attention_layernorm, hidden, lambda y: self._mlp(y, input_ids))
        return hidden, idx_loss
