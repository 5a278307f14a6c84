"""Model FLOPs per token for the DeepSeek family: Megatron's formula extended to MLA, MoE, MTP, the V3.2
DSA indexer and DeepSeek-V4 (mHC, sliding / CSA / HCA attention, V4 MTP). See docs/FLOPS.md for every term and
the conventions.

Conventions (Megatron's ``num_floating_point_operations``):
  * a GEMM [m,k]x[k,n] is 2mkn FLOPs; training = forward + wgrad + dgrad = 3 x forward;
  * causal attention counts half the score matrix (s/2 keys per query on average) for QK^T and PV;
  * routed experts count top-k experts per token; shared experts and dense FFNs are SwiGLU (3 GEMMs);
  * norms count one FLOP per element (Megatron's "+1" terms); router, softmax, RoPE, permutation and
    recomputation are not counted (this is model FLOPs, so MFU, not HFU);
  * the MTP module counts as one more decoder layer (MoE if the last decoder layer is MoE) plus its eh
    projection [2h -> h], its norms and its own output head;
  * the output head counts the padded vocabulary, once per MTP depth plus once for the main head.

DeepSeek-V4 (``v4_layer_macs``) counts every matrix product of the model as models/deepseek_v4 builds it, with
the keys each query may use (see docs/FLOPS.md): the window ``min(t + 1, sliding_window)``, the compressed
entries whose window is complete ``floor((t + 1) / ratio)`` (HCA: all of them, CSA: at most ``index_topk``),
exact means over the positions t; the mHC coefficient projections and the ``[n, n] x [n, h]`` stream mixing;
the lightning indexer (forward only when its loss is off: it runs under no_grad; with the loss, on detached
inputs: weight gradients only for its projections); e_proj and the per-stream h_proj of MTP. Elementwise work (norms, the mHC collapse and Sinkhorn, the compressor's pooling, RoPE, softmax)
and the router are not counted. tests/test_planner_v4.py checks the count against torch's FlopCounterMode on
the built model, forward and backward.

Public: ``model_flops_per_token(config, seq_len, padded_vocab_size=None)`` (training FLOPs per token) and
``flops_breakdown(...)`` (the same split by part, forward+backward, per token); ``v4_layer_macs(config, seq_len,
layer_idx)`` (one V4 layer's forward multiply-accumulates by term) and ``v4_indexer_flops(config, terms)``. Used
by the training log, bench/mfu.py and the planner.
"""
from __future__ import annotations

from typing import Dict, Optional

from ..config import ModelConfig

FWD_BWD = 3  # forward + backward-data + backward-weight
FMA = 2  # multiply + add


def _causal_keys(seq_len: int, window: Optional[int] = None) -> float:
    """Mean number of keys a query attends to under a causal mask, Megatron-style (s/2 when dense).

    With a cap of ``window`` keys per query (sliding window or top-k selection) the exact mean of
    min(t+1, w) over t is used once the window is shorter than the sequence."""
    if window is None or window <= 0 or window >= seq_len:
        return seq_len / 2.0
    w = float(window)
    return (w * (w + 1) / 2.0 + (seq_len - w) * w) / seq_len


def _mla_proj(cfg: ModelConfig) -> float:
    """Per-token forward multiply-accumulates of the MLA projections (Megatron's self_attn_term without 6x)."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    d_nope, d_rope, d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = cfg.q_lora_rank * (h + n * (d_nope + d_rope) + 1)  # q_a_proj, q_a_layernorm, q_b_proj
    else:
        q = h * n * (d_nope + d_rope)
    kv = cfg.kv_lora_rank * (h + n * (d_nope + d_v) + 1) + h * d_rope  # kv_a_proj (+rope key), norm, kv_b
    o = n * d_v * h
    return q + kv + o


def _mla_core(cfg: ModelConfig, seq_len: int, keys: Optional[float] = None) -> float:
    """Per-token forward MACs of QK^T and PV for MLA with ``keys`` keys per query (default causal s/2)."""
    k = _causal_keys(seq_len) if keys is None else keys
    n = cfg.num_attention_heads
    return k * n * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + k * n * cfg.v_head_dim


def _dsa_indexer(cfg: ModelConfig, seq_len: int) -> float:
    """V3.2 lightning indexer per token (MACs): wq_b from c_q, wk, weights_proj, causal ReLU scores."""
    h, nh, d = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
    q_in = cfg.q_lora_rank or h
    return q_in * nh * d + h * d + d + h * nh + _causal_keys(seq_len) * nh * d


def window_keys(seq_len: int, window: int) -> float:
    """Exact mean over t = 0..s-1 of min(t + 1, window): the keys of a causal sliding window (itself included)."""
    s, w = seq_len, min(window, seq_len)
    return (w * (w + 1) / 2.0 + (s - w) * w) / s


def visible_entries(seq_len: int, ratio: int, cap: Optional[int] = None) -> float:
    """Exact mean over t = 0..s-1 of the compressed entries query t may use, floor((t + 1) / ratio) (an entry's
    window of ``ratio`` tokens must be complete), capped at ``cap`` (CSA's index_topk)."""
    def total(u_max: int) -> float:  # sum over u = 1..u_max of floor(u / ratio)
        q, r = divmod(u_max, ratio)
        return ratio * q * (q - 1) / 2.0 + q * (r + 1) if q else 0.0
    s = seq_len
    if cap is None or cap * ratio - 1 >= s:
        return total(s) / s
    edge = cap * ratio - 1  # from u = cap * ratio on, floor(u / ratio) >= cap
    return (total(edge) + cap * (s - edge)) / s


def v4_indexer_flops(cfg: ModelConfig, terms: Dict[str, float]) -> float:
    """Training FLOPs per token of one CSA layer's lightning indexer from v4_layer_macs ``terms``. Without its
    loss it runs forward only (no_grad); with it (dsa_indexer_loss_coeff > 0) its inputs are detached, so the
    projections add only their weight gradient (x 2 in all) and the scores their two input gradients (x 3)."""
    proj, scores = terms["indexer_proj"], terms["indexer_scores"]
    if cfg.dsa_indexer_loss_coeff > 0:
        return FMA * (2 * proj + FWD_BWD * scores)
    return FMA * (proj + scores)


def v4_layer_macs(cfg: ModelConfig, seq_len: int, layer_idx: int) -> Dict[str, float]:
    """Forward multiply-accumulates per token of DeepSeek-V4 layer ``layer_idx`` (MTP layers: num_hidden_layers
    + k), by term: 'proj' (q_a, q_b, kv, grouped o_a, o_b), 'core' (QK^T and PV over the window and the
    compressed entries with the one shared KV head), 'compressor' (its kv / gate projections), CSA's lightning
    indexer as 'indexer_proj' (its compressor, q_b_proj, weights_proj) and 'indexer_scores' (the scores over the
    visible entries and their head weighting), 'mhc' (both mixings: the coefficient projection
    [n h -> (2 + n) n] and the [n, n] x [n, h] stream mix), 'ffn' (routed top-k + shared SwiGLU experts)."""
    h, n, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    L, G, R = cfg.q_lora_rank or h, cfg.o_groups or 1, cfg.o_lora_rank or h
    s = seq_len
    kind = cfg.attention_type(layer_idx)
    m = cfg.compress_ratio(layer_idx)
    out = {"proj": h * L + L * n * D + h * D + n * D * R + G * R * h, "compressor": 0.0, "indexer_proj": 0.0,
           "indexer_scores": 0.0}
    keys = window_keys(s, cfg.sliding_window)
    if kind == "heavily_compressed_attention":
        keys += visible_entries(s, m)
        out["compressor"] = 2 * D * h
    elif kind == "compressed_sparse_attention":
        keys += visible_entries(s, m, cfg.index_topk)
        out["compressor"] = 2 * 2 * D * h  # overlapping windows: 2 D channels per token
        nh, d = cfg.index_n_heads, cfg.index_head_dim
        out["indexer_proj"] = 2 * 2 * d * h + L * nh * d + h * nh
        out["indexer_scores"] = visible_entries(s, m) * (nh * d + nh)
    out["core"] = keys * n * D * 2
    hc = cfg.hc_mult
    out["mhc"] = 2 * ((2 + hc) * hc * hc * h + hc * hc * h) if hc else 0.0
    out["ffn"] = _ffn(cfg, True)
    return out


def _v4_breakdown(cfg: ModelConfig, seq_len: int, vocab: int) -> Dict[str, float]:
    """Training FLOPs per token of a V4 model by part (see v4_layer_macs; the head's and each MTP depth's
    hc_head collapse projection [n h -> n] under 'mhc', MTP's e_proj [h -> h] and per-stream h_proj under
    'mtp_extra')."""
    L, D, h, hc = cfg.num_hidden_layers, cfg.num_nextn_predict_layers, cfg.hidden_size, cfg.hc_mult
    out = {"attention": 0.0, "ffn": 0.0, "mhc": 0.0}
    for i in range(L + D):
        t = v4_layer_macs(cfg, seq_len, i)
        out["attention"] += FWD_BWD * FMA * (t["proj"] + t["core"] + t["compressor"]) + v4_indexer_flops(cfg, t)
        out["ffn"] += FWD_BWD * FMA * t["ffn"]
        out["mhc"] += FWD_BWD * FMA * t["mhc"]
    out["mhc"] += FWD_BWD * FMA * (D + 1) * hc * hc * h
    out["mtp_extra"] = FWD_BWD * FMA * D * (1 + hc) * h * h
    out["head"] = FWD_BWD * FMA * h * vocab * (D + 1)
    out["total"] = sum(out.values())
    return out


def _ffn(cfg: ModelConfig, moe: bool) -> float:
    """Per-token forward MACs of one SwiGLU FFN / MoE block (3 GEMMs per expert)."""
    h = cfg.hidden_size
    if not moe:
        return 3 * h * cfg.intermediate_size
    routed = cfg.num_experts_per_tok * cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * cfg.moe_intermediate_size
    return 3 * h * (routed + shared)


def flops_breakdown(cfg: ModelConfig, seq_len: int, padded_vocab_size: Optional[int] = None) -> Dict[str, float]:
    """Training FLOPs per token (forward + backward) split into attention, ffn, head, mtp_extra (V4: and mhc)."""
    if seq_len < 1:
        raise ValueError(f"seq_len {seq_len} must be >= 1 to count FLOPs")
    vocab = padded_vocab_size or cfg.vocab_size
    if cfg.model_type == "deepseek_v4":
        return _v4_breakdown(cfg, seq_len, vocab)
    L = cfg.num_hidden_layers
    D = cfg.num_nextn_predict_layers
    h = cfg.hidden_size
    moe_flags = [cfg.is_moe_layer(i) for i in range(L)]
    last_is_moe = moe_flags[-1] if moe_flags else False
    layer_moe = moe_flags + [last_is_moe] * D  # MTP block follows the last layer's FFN type (Megatron)
    attn = ffn = 0.0
    for i, moe in enumerate(layer_moe):
        a = _mla_proj(cfg)
        if cfg.has_indexer and cfg.index_topk < seq_len:
            a += _dsa_indexer(cfg, seq_len) + _mla_core(cfg, seq_len, _causal_keys(seq_len, cfg.index_topk))
        else:
            a += (_dsa_indexer(cfg, seq_len) if cfg.has_indexer else 0.0) + _mla_core(cfg, seq_len)
        attn += a
        ffn += _ffn(cfg, moe)
    mtp_extra = D * (3 * h + 2 * h * h)  # enorm + hnorm + final norm, eh_proj [2h -> h]
    head = h * vocab * (D + 1)
    out = {k: FWD_BWD * FMA * v for k, v in
           (("attention", attn), ("ffn", ffn), ("mtp_extra", mtp_extra), ("head", head))}
    out["total"] = sum(out.values())
    return out


def model_flops_per_token(cfg: ModelConfig, seq_len: int, padded_vocab_size: Optional[int] = None) -> float:
    """Training (forward + backward = 3 x forward) model FLOPs per token at sequence length ``seq_len``."""
    return flops_breakdown(cfg, seq_len, padded_vocab_size)["total"]


def model_flops_per_step(cfg: ModelConfig, seq_len: int, global_batch_size: int,
                         padded_vocab_size: Optional[int] = None) -> float:
    """FLOPs of one optimizer step over ``global_batch_size`` sequences of ``seq_len`` tokens."""
    return model_flops_per_token(cfg, seq_len, padded_vocab_size) * seq_len * global_batch_size
