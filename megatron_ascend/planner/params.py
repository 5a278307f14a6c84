"""Exact parameter counts per pipeline stage and per rank, from a ModelConfig and a layout.

Owns: the element count of every parameter tensor of a DeepSeek model (V2 / V2-Lite / V3 / V3.2 / V4 exactly
as the library builds them: tests/test_planner.py compares every rank of several TP / PP / EP layouts with the
built model chunks), split into what one rank holds under TP / EP / ETP and a pipeline stage's layers, and
which of them stay fp32 in bf16 training (``ParamCount.fp32``: the router weights; for V4 also the mHC
parameters and the V4RMSNorm weights, as models/deepseek_v4 marks them ``keep_fp32``).

Sharding rules (ARCHITECTURE.md, deepseek_architecture.md §5.1 / §9): column-parallel by heads / FFN width
(q_b_proj, kv_b_proj, q_proj, gate/up), row-parallel o_proj / down_proj, replicated q_a / kv_a projections,
norms and the router; vocab-parallel embedding and head; routed experts whole per EP rank, split over ETP.
V4 (models/deepseek_v4/attention.py): q_b_proj, the sinks, o_a_proj (by output group), o_b_proj and the
indexer's q_b_proj / weights_proj split over TP; q_a_proj, kv_proj, their norms and the compressors replicated.
MTP sits on the last stage and, on a rank without the first stage, holds its own copy of the word embedding
(Megatron-Core's rule; under dualpipev rank 0 holds both ends of the V, so one copy).

Does not own: bytes per parameter (memory.py), FLOPs (monitoring/flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError, ModelConfig, padded_vocab_size, pipeline_layer_split


@dataclass
class ParamCount:
    """Element counts on one rank, split into dense (reduced over dp) and expert (reduced over expert-dp)."""

    dense: int = 0
    expert: int = 0
    parts: Dict[str, int] = field(default_factory=dict)  # readable breakdown (dense + expert)
    fp32: int = 0  # dense elements the trainer keeps fp32 under bf16 (their own main params)

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def add(self, name: str, n: int, expert: bool = False, fp32: bool = False) -> None:
        if expert:
            self.expert += n
        else:
            self.dense += n
            self.fp32 += n if fp32 else 0
        self.parts[name] = self.parts.get(name, 0) + n

    def __iadd__(self, other: "ParamCount") -> "ParamCount":
        self.dense += other.dense
        self.expert += other.expert
        self.fp32 += other.fp32
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0) + v
        return self


def _div(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} {n} is not divisible by {d}; pick a parallel size that divides {n}")
    return n // d


def padded_vocab(cfg: ModelConfig, tp: int, divisible_by: int = 1) -> int:
    """Vocabulary rounded up to a multiple of divisible_by x tp (Megatron's --make-vocab-size-divisible-by)."""
    return padded_vocab_size(cfg.vocab_size, divisible_by, tp)


# -- attention ---------------------------------------------------------------------------------------------
def mla_params(cfg: ModelConfig, tp: int = 1) -> ParamCount:
    """MLA (V2 / V3 / V3.2) of one layer on one TP rank, including input_layernorm and the V3.2 indexer."""
    c = ParamCount()
    h, n = cfg.hidden_size, cfg.num_attention_heads
    nl = _div(n, tp, "num_attention_heads")
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.attention_bias:
        raise ValueError("attention_bias=True is not modelled by the planner; DeepSeek configs use false")
    c.add("norms", h)  # input_layernorm
    if cfg.q_lora_rank:
        c.add("attn_replicated", cfg.q_lora_rank * h + cfg.q_lora_rank)  # q_a_proj, q_a_layernorm
        c.add("attn_tp", nl * qk * cfg.q_lora_rank)  # q_b_proj
    else:
        c.add("attn_tp", nl * qk * h)  # q_proj
    c.add("attn_replicated", (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * h + cfg.kv_lora_rank)  # kv_a, norm
    c.add("attn_tp", nl * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank)  # kv_b_proj
    c.add("attn_tp", h * nl * cfg.v_head_dim)  # o_proj
    if cfg.has_indexer:
        nh, d = cfg.index_n_heads, cfg.index_head_dim
        q_in = cfg.q_lora_rank or h
        # wq_b, wk, k_norm (LayerNorm weight + bias), weights_proj: replicated over TP
        c.add("indexer", nh * d * q_in + d * h + 2 * d + nh * h)
    return c


def v4_attention_params(cfg: ModelConfig, layer_idx: int, tp: int = 1) -> ParamCount:
    """DeepSeek-V4 attention of layer ``layer_idx`` (MTP layers: num_hidden_layers + k) on one TP rank, with
    input_layernorm, as models/deepseek_v4/attention.py builds it: q_b_proj (heads), sinks, o_a_proj (whole
    output groups) and o_b_proj split over TP; q_a_proj, kv_proj, their norms and the compressor replicated; in
    CSA layers the lightning indexer's q_b_proj and weights_proj split over TP (its compressor replicated)."""
    c = ParamCount()
    h, n, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    q_lora, groups, o_lora = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    nl = _div(n, tp, "num_attention_heads")
    gl = _div(groups, tp, "o_groups")
    c.add("norms", h, fp32=True)  # input_layernorm (V4RMSNorm: kept fp32)
    c.add("attn_tp", nl)  # sinks
    c.add("attn_replicated", q_lora * h + q_lora + hd * h + hd)  # q_a_proj, q_a_norm, kv_proj, kv_norm
    c.add("attn_tp", nl * hd * q_lora)  # q_b_proj
    c.add("attn_tp", gl * o_lora * (n * hd // groups))  # o_a_proj [G*o_lora, H*hd/G]
    c.add("attn_tp", h * gl * o_lora)  # o_b_proj [h, G*o_lora]
    kind = cfg.attention_type(layer_idx)
    if kind != "sliding_attention":
        ratio = cfg.compress_ratio(layer_idx)
        width = (2 if kind == "compressed_sparse_attention" else 1) * hd  # CSA: overlapping windows
        # compressor: position_bias [ratio, width], kv_proj and gate_proj [width, h], kv_norm [hd]
        c.add("compressor", ratio * width + 2 * width * h + hd)
        if kind == "compressed_sparse_attention":
            nh, d = cfg.index_n_heads, cfg.index_head_dim
            c.add("indexer", ratio * 2 * d + 2 * 2 * d * h + d)  # its own overlapping compressor (replicated)
            c.add("indexer", _div(nh, tp, "index_n_heads") * (d * q_lora + h))  # q_b_proj, weights_proj
    return c


def hc_params(cfg: ModelConfig) -> int:
    """mHC mixing parameters of one layer (attention and FFN sublayers): fn [(2+m)m, m*h], base, scale [3]."""
    m = cfg.hc_mult
    if not m:
        return 0
    return 2 * ((2 + m) * m * m * cfg.hidden_size + (2 + m) * m + 3)


def hc_head_params(cfg: ModelConfig) -> int:
    """The stream collapse before a head (model.hc_head, each V4 MTP depth's own): hc_fn [m, m*h], hc_base [m],
    hc_scale [1]."""
    m = cfg.hc_mult
    return m * m * cfg.hidden_size + m + 1 if m else 0


# -- feed-forward ------------------------------------------------------------------------------------------
def ffn_params(cfg: ModelConfig, moe: bool, tp: int = 1, ep: int = 1, etp: int = 1) -> ParamCount:
    """Dense SwiGLU MLP or MoE block of one layer on one rank, with post_attention_layernorm."""
    c = ParamCount()
    h = cfg.hidden_size
    c.add("norms", h, fp32=cfg.model_type == "deepseek_v4")  # post_attention_layernorm (V4: kept fp32)
    if not moe:
        c.add("dense_mlp", 3 * h * _div(cfg.intermediate_size, tp, "intermediate_size"))
        return c
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    c.add("router", E * h, fp32=True)  # gate.weight, kept fp32 (the correction bias / tid2eid are buffers)
    if cfg.n_shared_experts:
        c.add("shared_experts", 3 * h * _div(cfg.n_shared_experts * I, tp, "shared expert width"))
    c.add("routed_experts", _div(E, ep, "n_routed_experts") * 3 * h * _div(I, etp, "moe_intermediate_size"),
          expert=True)
    return c


# -- layers, stages ----------------------------------------------------------------------------------------
def layer_params(cfg: ModelConfig, layer_idx: int, tp: int = 1, ep: int = 1, etp: int = 1,
                 mtp_block: bool = False) -> ParamCount:
    """One decoder layer (global index ``layer_idx``; ``mtp_block`` for the transformer block inside MTP: V4's
    MTP layer k is global layer num_hidden_layers + k, V2/V3's takes the last layer's FFN kind)."""
    c = ParamCount()
    if cfg.model_type == "deepseek_v4":
        c += v4_attention_params(cfg, layer_idx, tp)
        c.add("hc", hc_params(cfg), fp32=True)
        c += ffn_params(cfg, True, tp, ep, etp)
        return c
    c += mla_params(cfg, tp)
    last = cfg.num_hidden_layers - 1
    moe = cfg.is_moe_layer(last) if mtp_block else cfg.is_moe_layer(layer_idx)
    c += ffn_params(cfg, moe, tp, ep, etp)
    return c


def mtp_params(cfg: ModelConfig, tp: int = 1, ep: int = 1, etp: int = 1, depth: int = 0) -> ParamCount:
    """MTP depth ``depth`` (0-based; without the shared embedding / head): norms, projection, one block, its
    final norm (V4: e_proj, h_proj, enorm, hnorm, norm, its own hc_head)."""
    c = ParamCount()
    h = cfg.hidden_size
    if cfg.model_type == "deepseek_v4":
        c.add("mtp_proj", 2 * h * h)  # e_proj, h_proj (replicated)
        c.add("mtp_norms", 3 * h, fp32=True)  # enorm, hnorm, norm (V4RMSNorm)
        c.add("mtp_hc", hc_head_params(cfg), fp32=True)  # its hc_head
    else:
        c.add("mtp_proj", h * 2 * h + 3 * h)  # eh_proj [h, 2h] (replicated), enorm, hnorm, shared_head.norm
    blk = layer_params(cfg, cfg.num_hidden_layers + depth, tp, ep, etp, mtp_block=True)
    c += ParamCount(blk.dense, blk.expert, {"mtp_" + k: v for k, v in blk.parts.items()}, blk.fp32)
    return c


SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class StageSplit:
    """Which decoder layers each (pp rank, chunk) holds: layers[p][v] = tuple of global indices.

    1f1b / dualpipe: virtual stage k = v * pp + p (Megatron's interleaving; dualpipe's mirror is handled by the
    caller). dualpipev: 2 pp stages in a V, stage k < pp on rank k (chunk 0), stage k >= pp on rank 2 pp - 1 - k
    (chunk 1), so rank 0 holds the embedding *and* the head / MTP."""

    pp: int
    vp: int
    layers: Tuple[Tuple[Tuple[int, ...], ...], ...]
    first: Optional[int] = None
    last: Optional[int] = None
    schedule: str = "1f1b"
    layer_counts: Optional[Tuple[int, ...]] = None

    def rank_layers(self, p: int) -> List[int]:
        return [i for chunk in self.layers[p] for i in chunk]

    @property
    def head_rank(self) -> int:
        return 0 if self.schedule == "dualpipev" else self.pp - 1

    @property
    def head_chunk(self) -> Tuple[int, int]:
        """(rank, chunk) of the last pipeline stage: final norm, head, MTP."""
        return (0, 1) if self.schedule == "dualpipev" else (self.pp - 1, self.vp - 1)

    def is_first(self, p: int) -> bool:
        return p == 0

    def is_last(self, p: int) -> bool:
        return p == self.head_rank

    def p2p_transfers(self, p: int, m: int) -> Tuple[int, int]:
        """Activations this rank sends forward and gradients it sends backward in one step of m micro-batches."""
        if self.pp == 1:
            return 0, 0
        if self.schedule == "dualpipev":  # stage pp-1 -> pp stays on rank pp-1; stage 0 / 2pp-1 end the V
            n = m * (2 - (p == 0) - (p == self.pp - 1))
            return n, n
        return m * self.vp - (m if self.is_last(p) else 0), m * self.vp - (m if self.is_first(p) else 0)


def stage_split(cfg: ModelConfig, pp: int, vp: int = 1, first: Optional[int] = None,
                last: Optional[int] = None, layer_counts: Optional[Sequence[int]] = None,
                schedule: str = "1f1b") -> StageSplit:
    """Megatron's assignment (virtual stage k = v * pp + p holds the k-th contiguous block of layers), or the
    V of dualpipev; ``layer_counts`` gives the decoder layers of every stage in pipeline order explicitly (a
    --pipeline-model-parallel-layout, or MindSpeed's --noop-layers with the noop layers left out)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    v_shape = schedule == "dualpipev"
    stages = 2 * pp if v_shape else pp * vp
    L = cfg.num_hidden_layers
    if layer_counts is not None:
        counts = [int(c) for c in layer_counts]
        if len(counts) != stages or min(counts) < 0 or sum(counts) != L:
            raise ConfigError(f"layer counts give {len(counts)} stages summing to {sum(counts)} layers (min "
                              f"{min(counts, default=0)}); this layout needs {stages} stages "
                              f"({'2 x pp' if v_shape else 'pp x vp'}) of >= 0 layers summing to num_hidden_layers {L}")
    elif v_shape:
        counts = pipeline_layer_split(L, stages, 1, first, last)[0]
    else:
        per = pipeline_layer_split(L, pp, vp, first, last)  # per[v][p]
        counts = [per[k // pp][k % pp] for k in range(stages)]
    layers = [[() for _ in range(2 if v_shape else vp)] for _ in range(pp)]
    nxt = 0
    for k, c in enumerate(counts):
        if v_shape:
            p, v = (k, 0) if k < pp else (stages - 1 - k, 1)
        else:
            p, v = k % pp, k // pp
        layers[p][v] = tuple(range(nxt, nxt + c))
        nxt += c
    return StageSplit(pp, 2 if v_shape else vp, tuple(tuple(r) for r in layers), first, last, schedule,
                      tuple(counts) if layer_counts is not None else None)


def rank_params(cfg: ModelConfig, split: StageSplit, p: int, tp: int = 1, ep: int = 1, etp: int = 1,
                vocab_divisible_by: int = 1) -> ParamCount:
    """Everything a rank of pipeline stage ``p`` holds (its layers, plus embedding / head / MTP by stage)."""
    c = ParamCount()
    h = cfg.hidden_size
    V = padded_vocab(cfg, tp, vocab_divisible_by) // tp
    first, last = split.is_first(p), split.is_last(p)
    mtp = cfg.num_nextn_predict_layers
    if first:
        c.add("embedding", V * h)
    for i in split.rank_layers(p):
        c += layer_params(cfg, i, tp, ep, etp)
    if last:
        v4 = cfg.model_type == "deepseek_v4"
        c.add("final_norm", h, fp32=v4)
        if v4:
            c.add("hc", hc_head_params(cfg), fp32=True)  # model.hc_head
        if not (cfg.tie_word_embeddings and first):
            c.add("output_layer", V * h)  # a tied head on a later stage is a copy kept in sync
        if mtp:
            if not first:
                c.add("embedding", V * h)  # MTP's copy of the word embedding (shared through the embedding group)
            for k in range(mtp):
                c += mtp_params(cfg, tp, ep, etp, k)
    return c


def total_params(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """All parameters of the single-process model (MTP optional, as HF leaves it out)."""
    split = stage_split(cfg, 1)
    c = rank_params(cfg, split, 0)
    if not include_mtp and cfg.num_nextn_predict_layers:
        c2 = ParamCount()
        for k in range(cfg.num_nextn_predict_layers):
            c2 += mtp_params(cfg, depth=k)
        return c.total - c2.total
    return c.total


def active_params(cfg: ModelConfig, include_mtp: bool = False) -> int:
    """Parameters one token touches (top-k routed experts instead of all)."""
    total = total_params(cfg, include_mtp)
    moe_layers = cfg.num_moe_layers if cfg.model_type != "deepseek_v4" else cfg.num_hidden_layers
    if include_mtp and cfg.num_nextn_predict_layers and (cfg.model_type == "deepseek_v4"
                                                         or cfg.is_moe_layer(cfg.num_hidden_layers - 1)):
        moe_layers += cfg.num_nextn_predict_layers
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total - moe_layers * idle
