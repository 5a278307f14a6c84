"""DeepseekForCausalLM: embedding, decoder layers (by global index), final norm, head, MTP -- one pipeline chunk.

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

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ...config import ModelConfig, ParallelConfig
from ...tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from ...tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from ...tensor_parallel.random import checkpoint
from ...tensor_parallel.sharding import init_normal_
from ...tensor_parallel.utils import shard_of
from .hf_names import VOCAB_PARAMS, pad_vocab
from .layer import DecoderLayer
from .mtp import MTPLayer
from .norm import RMSNorm
from .rope import RotaryTables


def segment_mask(segment_ids: Optional[torch.Tensor], s: int) -> Optional[torch.Tensor]:
    """Block-diagonal causal mask bool [b, 1, s, s] (True = attend) for packed sequences; None = causal."""
    if segment_ids is None:
        return None
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal).unsqueeze(1)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Optional[ParallelConfig] = None, groups=None,
                 pre_process: bool = True, post_process: bool = True, layer_ids: Optional[List[int]] = None,
                 include_mtp: Optional[bool] = None, padded_vocab_size: Optional[int] = None,
                 init_seed: int = 1234, mtp_in_input: bool = False):
        super().__init__()
        if parallel is None:
            parallel = groups.config if groups is not None else ParallelConfig(world_size=1)
        if groups is None and parallel.world_size > 1:
            raise ValueError(f"ParallelConfig has world_size {parallel.world_size} but no ProcessGroups were "
                             f"given; pass groups=initialize_model_parallel(parallel)")
        self.config, self.parallel, self.groups = config, parallel, groups
        tp = parallel.tp
        self.sp = parallel.sequence_parallel and tp > 1
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_ids = list(range(config.num_hidden_layers)) if layer_ids is None else list(layer_ids)
        bad = [i for i in self.layer_ids if not 0 <= i < config.num_hidden_layers]
        if bad:
            raise ValueError(f"layer_ids {bad} are outside 0..{config.num_hidden_layers - 1}")
        if include_mtp is None:
            include_mtp = post_process
        self.include_mtp = bool(include_mtp) and config.num_nextn_predict_layers > 0
        self.mtp_in_input = bool(mtp_in_input) and config.num_nextn_predict_layers > 0
        if self.mtp_in_input and (not post_process or self.include_mtp):
            raise ValueError("mtp_in_input is for the loss chunk after a standalone MTP chunk: it needs "
                             "post_process=True and include_mtp=False")
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = padded_vocab_size or int(math.ceil(config.vocab_size / tp) * tp)
        if self.padded_vocab_size % tp or self.padded_vocab_size < config.vocab_size:
            raise ValueError(f"padded vocab size {self.padded_vocab_size} must be >= vocab_size "
                             f"{config.vocab_size} and a multiple of tensor-parallel size {tp}")
        h = config.hidden_size

        self.model = nn.Module()
        tied = config.tie_word_embeddings
        if pre_process or self.include_mtp or (post_process and tied):
            self.model.embed_tokens = VocabParallelEmbedding(self.padded_vocab_size, h, groups, self.sp)
            w = self.model.embed_tokens.weight
            if not pre_process:  # a later stage's copy: synced by the embedding group, counted once (stage 0)
                w.shared_embedding, w.shared = True, True
            elif parallel is not None and parallel.pp > 1 and (config.num_nextn_predict_layers > 0 or tied):
                w.shared_embedding, w.shared = True, False  # the canonical copy the last stage's copy follows
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(config, parallel, groups, i) for i in self.layer_ids})
        if self.include_mtp or (post_process and not self.mtp_in_input):  # where the decoder stack ends
            self.model.norm = RMSNorm(h, config.rms_norm_eps, sequence_parallel=self.sp)
        if post_process:
            self.lm_head = ColumnParallelLinear(h, self.padded_vocab_size, groups, sequence_parallel=self.sp)
            if tied:
                self.lm_head.weight = self.model.embed_tokens.weight
                self.model.embed_tokens.weight.shared_embedding = True
        if self.include_mtp:
            self.mtp = nn.Module()
            self.mtp.layers = nn.ModuleDict({str(k): MTPLayer(config, parallel, groups, k)
                                             for k in range(config.num_nextn_predict_layers)})
        self.rope = RotaryTables(config)
        self.input_tensor: Optional[torch.Tensor] = None
        # full recompute plan: list of lists of global layer ids; each inner list is one checkpointed chunk
        # (set by megatron_ascend.recompute.apply_recompute); layers in no chunk run normally
        self.recompute_chunks: List[List[int]] = []
        self.recompute_mtp = False  # full recompute also checkpoints each MTP depth
        self.init_weights(init_seed)

    # -- pipeline / trainer hooks -----------------------------------------------------------------------
    def set_input_tensor(self, t) -> None:
        if isinstance(t, (list, tuple)):
            t = t[0] if t else None
        self.input_tensor = t

    # -- init ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        std = self.config.init_method_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if leaf == "bias":
                p.zero_()
            elif p.dim() == 1 and "norm" in owner:
                p.fill_(1.0)
            elif name in VOCAB_PARAMS:
                full = torch.empty(self.vocab_size, p.shape[1], dtype=torch.float32)
                init_normal_(full, name, std, seed)
                p.copy_(shard_of(pad_vocab(full, self.padded_vocab_size), p))
            elif getattr(p, "is_expert", False):
                init_normal_(p, name, std, seed, expert_dim=0)
            else:
                init_normal_(p, name, std, seed)

    # -- forward ------------------------------------------------------------------------------------------
    def _layers(self, ids: List[int], hidden, cos, sin, mask, input_ids):
        losses = []
        for i in ids:
            hidden, l = self.model.layers[str(i)](hidden, cos, sin, mask, input_ids)
            if l is not None:
                losses.append(l)
        return hidden, losses

    def _decoder(self, hidden, cos, sin, mask, input_ids):
        losses: List[torch.Tensor] = []
        chunk_of = {}
        for chunk in self.recompute_chunks:
            for i in chunk:
                chunk_of[i] = tuple(chunk)
        pos = 0
        while pos < len(self.layer_ids):
            i = self.layer_ids[pos]
            chunk = chunk_of.get(i)
            if chunk is None or not torch.is_grad_enabled():
                hidden, ls = self._layers([i], hidden, cos, sin, mask, input_ids)
                pos += 1
            else:
                def run(h, _chunk=chunk):
                    h, ls_ = self._layers(list(_chunk), h, cos, sin, mask, input_ids)
                    return (h, torch.stack(ls_)) if ls_ else (h, None)
                hidden, stacked = checkpoint(run, hidden)
                ls = list(stacked.unbind(0)) if stacked is not None else []
                pos += len(chunk)
            losses.extend(ls)
        return hidden, losses

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # [s, b, V_pad/tp]

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None):
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rope(position_ids)
        mask = segment_mask(segment_ids, s)
        if self.pre_process:
            hidden = self.model.embed_tokens(input_ids)  # [s(/tp), b, h]
        else:
            if self.input_tensor is None:
                raise RuntimeError("this pipeline stage has no embedding; call set_input_tensor(hidden) first")
            hidden = self.input_tensor
        hidden, idx_losses = self._decoder(hidden, cos, sin, mask, input_ids)
        if not self.post_process and not self.include_mtp:
            return hidden
        D = self.config.num_nextn_predict_layers
        if self.mtp_in_input:  # [h_main; h_mtp_1; ...; h_mtp_D] from the standalone MTP chunk
            hidden, *mtp_hidden = hidden.chunk(D + 1, dim=0)
        else:
            hidden = self.model.norm(hidden)
            mtp_hidden = []
            if self.include_mtp and (labels is not None or not self.post_process):
                mtp_hidden = self._mtp(hidden, input_ids, cos, sin, mask, idx_losses)
        if not self.post_process:
            return torch.cat([hidden] + mtp_hidden, dim=0)
        logits = self._head(hidden)
        if labels is None:
            return logits
        V = self.vocab_size
        out: Dict[str, object] = {
            "lm_loss": vocab_parallel_cross_entropy(logits, labels.t(), self.groups, vocab_size=V).t(),
            "mtp_losses": [], "mtp_loss_masks": [],
            "mtp_loss_scale": self.config.mtp_loss_scaling_factor / max(D, 1),
        }
        if mtp_hidden:
            if loss_mask is None:
                loss_mask = torch.ones(b, s, dtype=torch.float32, device=input_ids.device)
            for k, prev in enumerate(mtp_hidden, start=1):
                labels_k = _shift_left(labels, k, 0)
                mask_k = _shift_left(loss_mask.float(), k, 0.0)
                if segment_ids is not None:
                    mask_k = mask_k * (segment_ids == _shift_left(segment_ids, k, -1)).float()
                loss_k = vocab_parallel_cross_entropy(self._head(prev), labels_k.t(), self.groups, vocab_size=V).t()
                out["mtp_losses"].append(loss_k * mask_k)
                out["mtp_loss_masks"].append(mask_k)
        out["indexer_loss"] = torch.stack(idx_losses).sum() if idx_losses else None
        return out

    def _mtp(self, hidden, input_ids, cos, sin, mask, idx_losses) -> List[torch.Tensor]:
        """The output of each MTP depth k = 1..D (DeepSeek-V3's sequential MTP: depth k combines the previous
        depth's output with the embedding of the tokens shifted by k)."""
        prev, outs = hidden, []
        for k in range(1, self.config.num_nextn_predict_layers + 1):
            ids_k = _shift_left(input_ids, k, 0)
            emb = self.model.embed_tokens(ids_k)
            layer = self.mtp.layers[str(k - 1)]
            if self.recompute_mtp and torch.is_grad_enabled():
                prev, l = checkpoint(lambda e, p_, _l=layer, _ids=ids_k: _l(e, p_, cos, sin, mask, _ids), emb, prev)
            else:
                prev, l = layer(emb, prev, cos, sin, mask, ids_k)
            if l is not None:
                idx_losses.append(l)
            outs.append(prev)
        return outs


def _shift_left(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """t[:, i + k] at position i; ``fill`` for the last k positions. t: [b, s]."""
    out = torch.full_like(t, fill)
    if k < t.shape[1]:
        out[:, : t.shape[1] - k] = t[:, k:]
    return out
