"""DeepseekV4ForCausalLM: one pipeline chunk of DeepSeek-V4 on the shared skeleton (models/chunk.py), equal to
transformers' DeepseekV4ForCausalLM (plus MTP, which transformers does not build).

    model = DeepseekV4ForCausalLM(cfg, par, groups, pre_process=True, post_process=True, layer_ids=None,
                                  include_mtp=None, padded_vocab_size=None, init_seed=1234)

Same constructor, hooks and forward outputs as DeepseekForCausalLM (see models/deepseek/model.py). What differs:
* the embedding output is copied into ``hc_mult`` residual streams: between layers and pipeline stages the
  activation is ``streams [s(/tp), b, hc_mult * h]`` (hyper_connection.py), so p2p, SP and recompute are unchanged;
* the last stage collapses the streams with ``model.hc_head`` (HyperHead) before ``model.norm`` and ``lm_head``;
* every layer gets the per-forward RoPE tables ``rope(position_ids, device)`` (rope.py: V4Rope, built once per
  forward: ``{"main": (cos, sin), "compress": (cos, sin)}``) and ``position_ids [b, s]``;
* MTP depth k reads the streams (not a normed hidden) and has its own ``hc_head`` and ``norm`` (mtp.py);
* one sequence per sample: ``segment_ids`` may only mark trailing padding (an unpacked SFT sample), which causal
  attention never shows to the sequence; packed sequences (tokens to train in a later segment) are refused --
  V4 attention's window and compressed entries have no segment boundaries (ValueError; the trainer refuses
  --sft-packing / --reset-attention-mask / --reset-position-ids for V4 up front).

Norm weights, mHC parameters and the attention's fp32 parameters stay fp32 in bf16 training (``keep_fp32``), as
transformers keeps them. Initialisation: every parameter drawn by its global name (std ``init_method_std``),
norms 1, mHC ``base`` 0 and ``scale`` 1; the attention draws its own (``self_attn.init_weights``: sinks and
compressor position biases 0, as transformers); each hash layer's ``tid2eid`` is a deterministic random table of distinct experts per token drawn from
(seed, name) (transformers leaves it 0 for a checkpoint to fill; a table of zeros would route every token to
expert 0). ``tid2eid`` is a buffer: never trained, saved and resharded with the checkpoint.
"""
from __future__ import annotations

import zlib

import torch

from ..chunk import CausalLMChunk
from .hyper_connection import HyperHead, expand
from .layer import DeepseekV4DecoderLayer
from .mtp import DeepseekV4MTPLayer
from .norm import V4RMSNorm

_ZERO_INIT = ("base", "hc_base", "sinks", "position_bias")
_ONE_INIT = ("scale", "hc_scale")


def build_rope(config):
    """The per-forward RoPE tables (v4attn's rope.py)."""
    from .rope import V4Rope
    return V4Rope(config)


def check_one_sequence(segment_ids: torch.Tensor, loss_mask=None) -> None:
    """V4 trains on one sequence per sample (then padding): segment ids may only mark trailing padding. Packed
    sequences would see each other through the sliding window and the compressed entries."""
    later = segment_ids != segment_ids[:, :1]
    packed = (later & (loss_mask > 0)).any() if loss_mask is not None else later.any()
    if bool(packed):
        raise ValueError("deepseek_v4 does not take packed sequences (tokens to train in a second segment_ids "
                         "segment): its sliding window and compressed entries would cross sequence boundaries; "
                         "train on one sequence per sample (drop --sft-packing)")


def hash_table(vocab: int, n_experts: int, topk: int, seed: int, name: str, rows_per_draw: int = 8192):
    """[vocab, topk] int64: for each token id, ``topk`` distinct experts, from a generator seeded by (seed, name)."""
    g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))
    parts = []
    for start in range(0, vocab, rows_per_draw):
        n = min(rows_per_draw, vocab - start)
        parts.append(torch.rand(n, n_experts, generator=g).topk(topk, dim=-1).indices)
    return torch.cat(parts, 0) if parts else torch.zeros(0, topk, dtype=torch.long)


class DeepseekV4ForCausalLM(CausalLMChunk):
    def build_layer(self, layer_idx: int):
        return DeepseekV4DecoderLayer(self.config, self.parallel, self.groups, layer_idx)

    def build_mtp_layer(self, depth_index: int):
        return DeepseekV4MTPLayer(self.config, self.parallel, self.groups, depth_index)

    def build_rope(self):
        return build_rope(self.config)

    def build_norm(self, dim: int):
        return V4RMSNorm(dim, self.config.rms_norm_eps, sequence_parallel=self.sp)

    def build_post_process(self) -> None:
        c = self.config
        self.model.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps, sequence_parallel=self.sp)

    def forward(self, input_ids, position_ids=None, labels=None, loss_mask=None, segment_ids=None):
        if segment_ids is not None:
            check_one_sequence(segment_ids, loss_mask)
        return super().forward(input_ids, position_ids, labels, loss_mask, segment_ids)

    def layer_context(self, input_ids, position_ids, segment_ids) -> tuple:
        # one sequence per sample (check_one_sequence): what follows it is padding, which causal attention never
        # shows to the sequence's own tokens, so the segments need no mask
        return self.rope(position_ids, input_ids.device), position_ids

    def mtp_step(self, layer, emb, prev, ctx, input_ids):
        return layer(emb, prev, *ctx, input_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return expand(self.model.embed_tokens(input_ids), self.config.hc_mult)  # [s(/tp), b, n*h]

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(self.model.hc_head(hidden))

    def mtp_input(self, hidden: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        return hidden  # the streams, before the head's collapse

    def init_param(self, name: str, p: torch.Tensor, seed: int) -> bool:
        if ".self_attn." in name:
            return True  # the attention draws its own (init_weights below)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _ZERO_INIT:
            p.zero_()
            return True
        if leaf in _ONE_INIT:
            p.fill_(1.0)
            return True
        return False

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        super().init_weights(seed)
        c = self.config
        for name, mod in self.named_modules():
            if name.endswith(".self_attn"):
                mod.init_weights(name + ".", c.init_method_std, seed)
        for name, buf in self.named_buffers():
            if name.endswith("mlp.gate.tid2eid"):
                buf.copy_(hash_table(c.vocab_size, c.n_routed_experts, c.num_experts_per_tok, seed, name))
