"""DeepseekForCausalLM (V2 / V3 / V3.2): embedding, decoder layers (by global index), final norm, head, MTP -- one
pipeline chunk, on the skeleton every model shares (models/chunk.py).

    model = DeepseekForCausalLM(cfg, par, groups, pre_process=True, post_process=True,
                                layer_ids=None,      # global layer indices of this chunk (default: all)
                                include_mtp=None,    # default: post_process (and cfg.num_nextn_predict_layers > 0)
                                mtp_in_input=False)  # the input carries MTP hidden states from an earlier chunk

(``pipeline_parallel.chunk_specs(placement, pp_rank)`` gives these per chunk; placement.py decides them.)

Modules (names equal HF's where the tensor exists there): ``model.embed_tokens`` (VocabParallelEmbedding,
on the first stage, and on the last stage too when MTP or tied embeddings need it -- then its weight carries
``shared_embedding = True`` and the pipeline's embedding group keeps the copies equal), ``model.layers`` (a
ModuleDict keyed by ``str(global index)``), ``model.norm``, ``lm_head`` (ColumnParallelLinear over the padded
vocab; tied to the embedding when ``tie_word_embeddings``), ``mtp.layers.{k}``.

``forward(input_ids [b, s], position_ids=None, labels=None, loss_mask=None, segment_ids=None)``:
  * not the last stage: hidden ``[s(/tp), b, h]`` (input from ``set_input_tensor`` unless pre_process)
  * a chunk with the MTP layers but not the loss (standalone MTP, layout ``...m|L``): the final norm and the MTP
    depths run here and the output is ``cat([h_main, h_mtp_1, ..., h_mtp_D], dim 0)`` ``[(1+D) s(/tp), b, h]``
    (normed main hidden, then each depth's output); the loss chunk, built with ``mtp_in_input=True``, splits it
    and applies no final norm (it has none)
  * last stage, no labels: vocab-parallel logits ``[s, b, V_pad/tp]``
  * last stage with labels: ``{'lm_loss': [b, s] fp32 per-token (unmasked), 'mtp_losses': [[b, s] per depth,
    already multiplied by that depth's mask], 'mtp_loss_masks': [[b, s] per depth], 'mtp_loss_scale':
    mtp_loss_scaling_factor / D, 'indexer_loss': detached sum over this chunk's DSA layers (coefficient not
    applied) or None}``. The trainer adds ``mtp_loss_scale * sum_k sum(mtp_losses[k])`` normalised like the LM
    loss. The DSA indexer loss is NOT to be added again: its gradient (``dsa_indexer_loss_coeff`` times the aux-loss
    scale) is attached inside each layer, so it flows from every pipeline stage; the trainer sets the scale with
    ``moe.set_aux_loss_scale`` (1 / (micro-batches x dp)), as for the MoE aux losses.

Initialisation is layout independent: every parameter is drawn by its global name (``sharding.init_normal_``,
std ``init_method_std``); norms are 1, biases 0; the padded vocab rows are 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...platform import kernels
from ..chunk import CausalLMChunk
from .layer import DecoderLayer
from .mtp import MTPLayer
from .rope import RotaryTables


def segment_mask(segment_ids: Optional[torch.Tensor], s: int) -> Optional[torch.Tensor]:
    """Block-diagonal causal mask bool [b, 1, s, s] (True = attend) for packed sequences; None = causal."""
    if segment_ids is None:
        return None
    return kernels.packed_mask(segment_ids)  # remembers the segments: a varlen attention kernel may use them


class DeepseekForCausalLM(CausalLMChunk):
    """V2 / V2-Lite / V3 / V3.2 on the shared chunk skeleton (models/chunk.py)."""

    def build_layer(self, layer_idx: int):
        return DecoderLayer(self.config, self.parallel, self.groups, layer_idx)

    def build_mtp_layer(self, depth_index: int):
        return MTPLayer(self.config, self.parallel, self.groups, depth_index)

    def build_rope(self):
        return RotaryTables(self.config)

    def layer_context(self, input_ids, position_ids, segment_ids) -> tuple:
        cos, sin = self.rope(position_ids)
        return cos, sin, segment_mask(segment_ids, input_ids.shape[1])

    def mtp_step(self, layer, emb, prev, ctx, input_ids):
        x, l = layer(emb, prev, *ctx, input_ids)
        return x, x, l

