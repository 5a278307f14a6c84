"""Model FLOPs per token for the DeepSeek family: Megatron's formula extended to MLA, MoE, MTP, the V3.2
DSA indexer and (approximately) V4's attention. See docs/FLOPS.md for every term and the conventions.

Conventions (Megatron's ``num_floating_point_operations``):
  * a GEMM [m,k]x[k,n] is 2mkn FLOPs; training = forward + wgrad + dgrad = 3 x forward;
  * causal attention counts half the score matrix (s/2 keys per query on average) for QK^T and PV;
  * routed experts count top-k experts per token; shared experts and dense FFNs are SwiGLU (3 GEMMs);
  * norms count one FLOP per element (Megatron's "+1" terms); router, softmax, RoPE, permutation and
    recomputation are not counted (this is model FLOPs, so MFU, not HFU);
  * the MTP module counts as one more decoder layer (MoE if the last decoder layer is MoE) plus its eh
    projection [2h -> h], its norms and its own output head;
  * the output head counts the padded vocabulary, once per MTP depth plus once for the main head.

Public: ``model_flops_per_token(config, seq_len, padded_vocab_size=None)`` (training FLOPs per token) and
``flops_breakdown(...)`` (the same split by part, forward+backward, per token). Used by the training log,
bench/mfu.py and the planner.
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


def _v4_attention(cfg: ModelConfig, seq_len: int, ratio: int) -> float:
    """DeepSeek-V4 attention per token (MACs), approximate: shared-KV MQA over a sliding window plus the
    compressed entries (CSA ratio 4 with an indexer top-k, HCA ratio 128 dense over compressed entries),
    grouped output projection and mHC mixing. Not yet checked against a reference FLOP counter."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    hd = cfg.head_dim or (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q_lora = cfg.q_lora_rank or h
    groups = cfg.o_groups or 1
    o_lora = cfg.o_lora_rank or h
    macs = h * q_lora + q_lora + q_lora * n * hd + h * hd + hd  # wq_a, q_norm, wq_b, wkv, kv_norm
    macs += n * hd * o_lora + groups * o_lora * h  # wo_a (grouped), wo_b
    keys = _causal_keys(seq_len, cfg.sliding_window or None)
    if ratio:
        entries = seq_len / ratio  # compressed entries visible to the last query
        overlap = 2 if ratio == 4 else 1
        macs += h * overlap * hd * 2  # compressor wkv + wgate
        if ratio == 4 and cfg.index_topk:
            nh, d = cfg.index_n_heads, cfg.index_head_dim
            macs += q_lora * nh * d + h * nh + h * overlap * d * 2  # indexer q, weights, its compressor
            macs += (entries / 2.0) * nh * d  # indexer scores over compressed entries (causal)
            keys += _causal_keys(int(entries), cfg.index_topk) if entries >= 1 else 0.0
        else:
            keys += entries / 2.0
    macs += keys * n * hd * 2  # QK^T and PV with one shared 512-wide KV head
    if cfg.hc_mult:
        m = cfg.hc_mult
        macs += 2 * ((2 + m) * m * m * h)  # mHC mixing weights for the attention and FFN sublayers
    return macs


def _ffn(cfg: ModelConfig, moe: bool) -> float:
    """Per-token forward MACs of one SwiGLU FFN / MoE block (3 GEMMs per expert)."""
    h = cfg.hidden_size
    if not moe:
        return 3 * h * cfg.intermediate_size
    routed = cfg.num_experts_per_tok * cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * cfg.moe_intermediate_size
    return 3 * h * (routed + shared)


def flops_breakdown(cfg: ModelConfig, seq_len: int, padded_vocab_size: Optional[int] = None) -> Dict[str, float]:
    """Training FLOPs per token (forward + backward) split into attention, ffn, head, mtp_extra."""
    if seq_len < 1:
        raise ValueError(f"seq_len {seq_len} must be >= 1 to count FLOPs")
    vocab = padded_vocab_size or cfg.vocab_size
    L = cfg.num_hidden_layers
    D = cfg.num_nextn_predict_layers
    h = cfg.hidden_size
    moe_flags = [cfg.is_moe_layer(i) for i in range(L)]
    last_is_moe = moe_flags[-1] if moe_flags else False
    layer_moe = moe_flags + [last_is_moe] * D  # MTP block follows the last layer's FFN type (Megatron)
    attn = ffn = 0.0
    for i, moe in enumerate(layer_moe):
        if cfg.model_type == "deepseek_v4":
            ratios = cfg.compress_ratios
            ratio = ratios[i] if i < len(ratios) else 0
            attn += _v4_attention(cfg, seq_len, ratio)
        else:
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
