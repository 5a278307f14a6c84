"""The causal-LM pipeline chunk every DeepSeek model is built on: embedding, decoder layers registered by global
index, final norm, output head, per-token loss, MTP plumbing and the full-recompute plan.

    class MyModel(CausalLMChunk):
        def build_layer(self, i)             -> nn.Module   # decoder layer with global index i
        def build_mtp_layer(self, k)         -> nn.Module   # MTP depth k (0-based)
        def layer_context(self, ids, pos, seg) -> tuple     # per-forward extras every layer call receives
        def run_layer(self, layer, hidden, ctx, input_ids)  -> (hidden, detached aux loss or None)
        def mtp_step(self, layer, emb, prev, ctx, ids_k)    -> (prev for the next depth, head input, loss or None)
        # optional: build_rope(), build_norm(dim), build_post_process(), embed(ids), final_hidden(hidden),
        #           mtp_input(hidden, normed), init_param(name, p, seed)

Constructor ``(config, parallel, groups, pre_process, post_process, layer_ids, include_mtp, padded_vocab_size,
init_seed, mtp_in_input)``; forward and its outputs are documented in models/deepseek/model.py (the same for
every model). A chunk with the MTP layers but not the loss (a standalone MTP chunk) returns
``cat([head input, MTP depth 1 head input, ...], dim 0)`` ``[(1+D) s(/tp), b, h]``; the loss chunk after it is
built with ``mtp_in_input=True``, splits it and holds no final norm.

Owns (names equal HF's where the tensor exists there): ``model.embed_tokens`` (VocabParallelEmbedding, on the
first stage, and on the last stage too when MTP or tied embeddings need it -- then its weight carries
``shared_embedding = True`` and the pipeline's embedding group keeps the copies equal), ``model.layers`` (a
ModuleDict keyed by ``str(global index)``), ``model.norm``, ``lm_head`` (ColumnParallelLinear over the padded
vocab; tied to the embedding when ``tie_word_embeddings``), ``mtp.layers.{k}``; the layout-independent
initialisation (every parameter drawn by its global name); the recompute plan fields that
megatron_ascend.recompute sets (``recompute_chunks``, ``recompute_mtp``).

Does not own: what a layer is (the model packages), pipeline schedules, the loss reduction (training/step.py).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import ModelConfig, ParallelConfig
from ..tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from ..tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from ..tensor_parallel.random import checkpoint
from ..tensor_parallel.sharding import init_normal_
from ..tensor_parallel.utils import shard_of


class DecoderLayerBase(nn.Module):
    """A decoder layer (or MTP block) of any model: what megatron_ascend.recompute and its memory meter look for.

    ``layer_recompute``: the selective-recompute module names the layer itself acts on (it reads
    ``self.recompute_modules``); its ``self_attn`` lists its own in ``supports_recompute`` and its MoE block in
    ``mlp.supports_recompute``. ``is_moe`` says whether ``mlp`` is the MoE block."""

    layer_recompute: Tuple[str, ...] = ()
    is_moe: bool = False


class CausalLMChunk(nn.Module):
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
        self.model.layers = nn.ModuleDict({str(i): self.build_layer(i) for i in self.layer_ids})
        if self.include_mtp or (post_process and not self.mtp_in_input):  # where the decoder stack ends
            self.build_post_process()
            self.model.norm = self.build_norm(h)
        if post_process:
            self.lm_head = ColumnParallelLinear(h, self.padded_vocab_size, groups, sequence_parallel=self.sp)
            if tied:
                self.lm_head.weight = self.model.embed_tokens.weight
                self.model.embed_tokens.weight.shared_embedding = True
        if self.include_mtp:
            self.mtp = nn.Module()
            self.mtp.layers = nn.ModuleDict({str(k): self.build_mtp_layer(k)
                                             for k in range(config.num_nextn_predict_layers)})
        self.rope = self.build_rope()
        self.input_tensor: Optional[torch.Tensor] = None
        # full recompute plan: list of lists of global layer ids; each inner list is one checkpointed chunk
        # (set by megatron_ascend.recompute.apply_recompute); layers in no chunk run normally
        self.recompute_chunks: List[List[int]] = []
        self.recompute_mtp = False  # full recompute also checkpoints each MTP depth
        self.init_weights(init_seed)

    # -- what a model defines -----------------------------------------------------------------------------
    def build_layer(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def build_mtp_layer(self, depth_index: int) -> nn.Module:
        raise NotImplementedError

    def build_rope(self):
        return None

    def build_norm(self, dim: int) -> nn.Module:
        from .deepseek.norm import RMSNorm  # here, not at import: models.deepseek imports this module
        return RMSNorm(dim, self.config.rms_norm_eps, sequence_parallel=self.sp)

    def build_post_process(self) -> None:
        """Extra modules of the chunk where the decoder stack ends, registered before ``model.norm`` (V4: the
        head's stream mixing)."""

    def layer_context(self, input_ids, position_ids, segment_ids) -> tuple:
        """The extra positional arguments every layer call of this forward receives."""
        raise NotImplementedError

    def run_layer(self, layer, hidden, ctx: tuple, input_ids):
        return layer(hidden, *ctx, input_ids)

    def mtp_step(self, layer, emb, prev, ctx: tuple, input_ids):
        """(prev for the next depth, input of the shared head, detached aux loss or None)."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [s(/tp), b, h]

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder stack's output -> the head's input."""
        return self.model.norm(hidden)

    def mtp_input(self, hidden: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """What MTP depth 1 reads from the main model (V3: the final-normed hidden)."""
        return normed

    def init_param(self, name: str, p: torch.Tensor, seed: int) -> bool:
        """Initialise a parameter the generic rule does not cover; True when done."""
        return False

    # -- pipeline / trainer hooks -----------------------------------------------------------------------
    def set_input_tensor(self, t) -> None:
        if isinstance(t, (list, tuple)):
            t = t[0] if t else None
        self.input_tensor = t

    # -- init ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        from .deepseek.hf_names import VOCAB_PARAMS, pad_vocab
        std = self.config.init_method_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if self.init_param(name, p, seed):
                continue
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
    def _layers(self, ids: List[int], hidden, ctx, input_ids):
        losses = []
        for i in ids:
            hidden, l = self.run_layer(self.model.layers[str(i)], hidden, ctx, input_ids)
            if l is not None:
                losses.append(l)
        return hidden, losses

    def _decoder(self, hidden, ctx, input_ids):
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
                hidden, ls = self._layers([i], hidden, ctx, input_ids)
                pos += 1
            else:
                def run(h, _chunk=chunk):
                    h, ls_ = self._layers(list(_chunk), h, ctx, input_ids)
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
        ctx = self.layer_context(input_ids, position_ids, segment_ids)
        if self.pre_process:
            hidden = self.embed(input_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("this pipeline stage has no embedding; call set_input_tensor(hidden) first")
            hidden = self.input_tensor
        hidden, idx_losses = self._decoder(hidden, ctx, input_ids)
        if not self.post_process and not self.include_mtp:
            return hidden
        D = self.config.num_nextn_predict_layers
        if self.mtp_in_input:  # [head input; MTP depth 1 head input; ...] from the standalone MTP chunk
            normed, *mtp_heads = hidden.chunk(D + 1, dim=0)
        else:
            normed = self.final_hidden(hidden)
            mtp_heads = []
            if self.include_mtp and (labels is not None or not self.post_process):
                mtp_heads = self._mtp(self.mtp_input(hidden, normed), input_ids, ctx, idx_losses)
        if not self.post_process:
            return torch.cat([normed] + mtp_heads, dim=0)
        logits = self._head(normed)
        if labels is None:
            return logits
        V = self.vocab_size
        out: Dict[str, object] = {
            "lm_loss": vocab_parallel_cross_entropy(logits, labels.t(), self.groups, vocab_size=V).t(),
            "mtp_losses": [], "mtp_loss_masks": [],
            "mtp_loss_scale": self.config.mtp_loss_scaling_factor / max(D, 1),
        }
        if mtp_heads:
            if loss_mask is None:
                loss_mask = torch.ones(b, s, dtype=torch.float32, device=input_ids.device)
            for k, head_in in enumerate(mtp_heads, start=1):
                labels_k = shift_left(labels, k, 0)
                mask_k = shift_left(loss_mask.float(), k, 0.0)
                if segment_ids is not None:
                    mask_k = mask_k * (segment_ids == shift_left(segment_ids, k, -1)).float()
                loss_k = vocab_parallel_cross_entropy(self._head(head_in), labels_k.t(), self.groups,
                                                      vocab_size=V).t()
                out["mtp_losses"].append(loss_k * mask_k)
                out["mtp_loss_masks"].append(mask_k)
        out["indexer_loss"] = torch.stack(idx_losses).sum() if idx_losses else None
        return out

    def _mtp(self, prev, input_ids, ctx, idx_losses) -> List[torch.Tensor]:
        """The head input of each MTP depth k = 1..D (sequential MTP: depth k combines what the previous depth
        passes on with the embedding of the tokens shifted by k)."""
        heads = []
        for k in range(1, self.config.num_nextn_predict_layers + 1):
            ids_k = shift_left(input_ids, k, 0)
            emb = self.model.embed_tokens(ids_k)
            layer = self.mtp.layers[str(k - 1)]
            if self.recompute_mtp and torch.is_grad_enabled():
                prev, head_in, l = checkpoint(
                    lambda e, p_, _l=layer, _ids=ids_k: self.mtp_step(_l, e, p_, ctx, _ids), emb, prev)
            else:
                prev, head_in, l = self.mtp_step(layer, emb, prev, ctx, ids_k)
            if l is not None:
                idx_losses.append(l)
            heads.append(head_in)
        return heads


def shift_left(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """t[:, i + k] at position i; ``fill`` for the last k positions. t: [b, s]."""
    out = torch.full_like(t, fill)
    if k < t.shape[1]:
        out[:, : t.shape[1] - k] = t[:, k:]
    return out
