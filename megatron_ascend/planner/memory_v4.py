"""DeepSeek-V4 activations: the bytes autograd keeps for backward per micro-batch token, term by term, for the
model as models/deepseek_v4 builds it (its reference kernels: the per-layer breakdown below is what
recompute.SavedTensorMeter measures. tests/test_planner_v4.py checks it on a tiny V4 with sliding, CSA and HCA
layers, hash- and score-routed MoE, the indexer loss on and an MTP depth: per layer, MTP depth and whole forward
in fp32 without recompute, with the planner's selective set, mhc alone, core_attn + moe and full recompute; per
layer in bf16 without recompute and selective; all within 1 % today, the test's bound is 10 %. The TP / SP /
EP divisions below follow the model's sharding but are not metered on a multi-rank run).

A V4 layer keeps, per token (``a`` = bytes of an activation element, ``n = hc_mult``; "local" = this rank's
tokens under sequence parallel, else every token):

* each of its two mHC mixings (local): the ``n h`` streams (``a``), their fp32 copy (bf16 only), the fp32 RMS-
  normalised copy the coefficient projection keeps, the coefficients and every step of the Sinkhorn iteration
  (``(2 iters - 1) (n^2 + n)`` fp32: each division keeps its numerator and denominator), and the mix's
  inputs (comb, the sublayer output, post). With ``mhc`` recomputed only the streams and ``pre`` stay.
* the two V4RMSNorms (local): an fp32 copy of the input, the fp32 normalised values and 1/rms (``8 h + 4``),
  and their output (``a h``, kept by its consumer); with ``layernorm`` only the input.
* attention: q_a / kv norms (local); on every token of the sequence (after the all-gather under SP) with this
  rank's heads ``H/tp``: q_b_proj's input, its output and the rotated q (``mla_up_proj`` drops both), the
  rotated kv, three complex RoPE tables, the probabilities of core attention's query blocks (fp32,
  ``core_attn`` drops them), the de-rotated output and o_a_proj's output; compressed layers also the
  compressor's pooling (softmax, its cast, the values: per entry ``c m D``), the entries and their norm; CSA's
  gathered entry indices; with the indexer loss the indexer's own pooling, scores and KL terms (its scores are
  ``[s, s/m]`` per indexer head: quadratic in s, as the reference form computes them).
* MoE: the router on this rank's own 1/tp of the tokens (fp32 input copy, logits, sqrt-softplus scores, top-k,
  weights), the permutation, the dispatched rows and the clamped SwiGLU (6 tensors of ``I``, 2 with
  ``moe_act``), the fp32 combine inputs; the shared expert on every token (on a gathered copy under SP).

Where a fused NPU kernel (npu_rms_norm, fused attention) replaces a reference kernel it keeps less; the planner
counts the reference kernels, so it errs on the large side there.

Public: ``layer_terms(cfg, layer_idx, o)``, ``mtp_extra_terms(cfg, o)``, ``head_bytes(cfg, o, vocab_local,
with_mtp)``, ``embedding_bytes(cfg, o)``, ``rope_checkpoint_bytes(cfg, o, layer_ids)``; memory.py dispatches here
for model_type deepseek_v4.
"""
from __future__ import annotations

from typing import Dict, Iterable

from ..config import ModelConfig

F32 = 4


def _ctx(o):
    tp = o.tp
    loc = 1.0 / tp if o.sp and tp > 1 else 1.0  # token-parallel parts under SP
    mods = set(o.selective_modules) if o.recompute == "selective" else set()
    return tp, loc, mods, o.act_bytes


def mixing_bytes(cfg: ModelConfig, o, recompute_mhc: bool) -> float:
    """One mHC mixing (attn_hc / ffn_hc and the stream mix after the sublayer), per token."""
    _, loc, _, a = _ctx(o)
    n, h = cfg.hc_mult, cfg.hidden_size
    mix = n * n * a + h * a + n * a  # hc_post: comb (cast), the sublayer output, post (cast)
    if recompute_mhc:
        return loc * (n * h * a + n * F32 + mix)  # the streams (checkpoint input) and pre
    copy = n * h * F32 if a < F32 else 0  # streams.float()
    coeff = F32 + n * h * F32 + (2 + n) * n * F32 + 2 * n * F32 + n * n * F32  # 1/rms, normalised, m, sigmoids, softmax
    sinkhorn = (2 * cfg.hc_sinkhorn_iters - 1) * (n * n + n) * F32
    collapse = n * F32 + n * h * a  # pre and the streams
    return loc * (copy + coeff + sinkhorn + collapse + mix)


def _v4_norm(dim: int) -> float:
    """V4RMSNorm (fp32 weight): fp32 input copy, fp32 normalised values, 1/rms."""
    return 2 * dim * F32 + F32


def _rms_norm(dim: int, a: int) -> float:
    """The deepseek RMSNorm reference kernel: fp32 input, 1/rms, the normalised values cast back."""
    return dim * F32 + F32 + dim * a


def _query_block_keys(s: int, window: int, block: int, entries: int) -> float:
    """Probabilities core attention keeps per query (per head): each query block of r rows keeps r x (its window
    keys + the compressed logits + the sink)."""
    from ..models.deepseek_v4.core_attention import query_blocks
    return sum((e - a0) * (e - k0 + entries + 1) for a0, e, k0 in query_blocks(s, window, block)) / s


def attention_terms(cfg: ModelConfig, layer_idx: int, o, query_block: int = 128) -> Dict[str, float]:
    tp, loc, mods, a = _ctx(o)
    h, H, D, L = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    Hl, Gl, R, r = H / tp, cfg.o_groups / tp, cfg.o_lora_rank, cfg.qk_rope_head_dim
    s = o.seq_length
    kind, m = cfg.attention_type(layer_idx), cfg.compress_ratio(layer_idx)
    up, core = "mla_up_proj" in mods, "core_attn" in mods
    t: Dict[str, float] = {}
    t["attn.input"] = 0.0 if "layernorm" in mods else loc * h * a  # the normed x the projections keep
    t["attn.latent_norms"] = loc * (_rms_norm(L, a) + _rms_norm(D, a))  # q_a_norm, kv_norm
    t["attn.c_q"] = L * a  # q_b_proj's input (mla_up_proj's checkpoint input)
    t["attn.q"] = 0.0 if up else Hl * (D * a + F32)  # q_b_proj output (the per-head norm's input), 1/rms
    # the rotated q: core attention's input; mla_up_proj frees it even when core_attn's checkpoint takes it as an
    # input (torch saves checkpoint inputs through the saved-tensor hooks, which mla_up_proj's discard intercepts)
    t["attn.q_rot"] = 0.0 if up else Hl * D * a
    t["attn.kv_rot"] = D * a
    t["attn.rope"] = (2 if up else 3) * 4 * r  # complex cos + i sin of kv, q, the output's inverse rotation
    entries = s // m if m else 0
    picked = 0
    if kind != "sliding_attention":
        c = 2 if kind == "compressed_sparse_attention" else 1  # CSA: overlapping windows
        per_entry = entries / s
        pool = c * m * D * (F32 + (a if a < F32 else 0) + a)  # softmax (fp32), its cast, the values
        t["attn.compressor"] = per_entry * (pool + _rms_norm(D, a) + D * a + 4 * r)  # + entries, their RoPE
        picked = entries
        if kind == "compressed_sparse_attention":
            topk = min(cfg.index_topk, entries)
            if 2 * topk <= entries:  # gathered: only the picked entries are scored, their indices kept
                picked = topk
                t["attn.selected"] = topk * 8
            if cfg.dsa_indexer_loss_coeff > 0:
                t.update(_indexer_loss_terms(cfg, o, m, entries))
    if not core:
        t["attn.probs"] = Hl * F32 * _query_block_keys(s, cfg.sliding_window, query_block, picked)
    elif picked and picked == entries:  # the checkpoint keeps the dense path's bool [s, entries] mask
        t["attn.mask"] = float(entries)
    t["attn.out"] = Hl * D * a + Gl * R * a  # o_a_proj's input (de-rotated o), o_b_proj's input
    return t


def _indexer_loss_terms(cfg: ModelConfig, o, m: int, entries: int) -> Dict[str, float]:
    """What a CSA layer keeps when the lightning indexer trains (its inputs are detached copies)."""
    tp, loc, mods, a = _ctx(o)
    h, D, L, r = cfg.hidden_size, cfg.head_dim, cfg.q_lora_rank, cfg.qk_rope_head_dim
    nl, d = cfg.index_n_heads / tp, cfg.index_head_dim
    s = o.seq_length
    t: Dict[str, float] = {}
    t["attn.indexer.latent"] = (L + D + 2 * 2 * D) * a  # the detached c_q pins the gathered [c_q|kv|values|gates]
    if loc < 1:  # the detached x: a gathered copy under SP (else a view of the normed x)
        t["attn.indexer.x"] = h * a
    pool = 2 * m * d * (F32 + (a if a < F32 else 0) + a)
    t["attn.indexer.keys"] = entries / s * (pool + _rms_norm(d, a) + 4 * r)
    # q (fp32), its RoPE table, the fp32 keys the score matmul keeps (one [entries, d] per sequence, not per
    # query), ReLU scores [s, heads, entries], head weights
    t["attn.indexer.scores"] = nl * d * F32 + 4 * r + entries / s * d * F32 + nl * entries * F32 + nl * F32
    rows = max(s - m + 1, 0) / s  # queries with at least one visible entry
    t["attn.indexer.kl"] = 1 + rows * entries * (3 + 2 * F32)  # row mask; 3 masks, log q, p per row
    return t


def ffn_terms(cfg: ModelConfig, o) -> Dict[str, float]:
    """post_attention_layernorm and the MoE block (moe/: router, all-to-all dispatcher, grouped experts)."""
    tp, loc, mods, a = _ctx(o)
    h, E, k, I = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    sp = loc < 1
    shared = cfg.n_shared_experts * I
    t: Dict[str, float] = {}
    t["ffn.norm"] = loc * (h * a if "layernorm" in mods else _v4_norm(h))
    if "moe" in mods:
        t["ffn.moe_input"] = loc * h * a  # the checkpoint's input
        return t
    own = 1.0 / tp  # every TP rank routes its own 1/tp of the tokens
    # the norm output: kept by the shared expert (without SP) or by the fp32 router (fp32); discarded by layernorm
    if "layernorm" not in mods and (a == F32 or (shared and not sp)):
        t["ffn.input"] = loc * h * a
    if shared and sp:
        t["ffn.shared_input"] = h * a  # the gathered copy the shared expert keeps
    t["ffn.router"] = own * ((h * F32 if a < F32 else 0) + 2 * E * F32 + k * 8 + F32 + k * F32)
    rows = own * k * o.etp  # dispatched rows per token (balanced routing)
    t["ffn.permutation"] = own * k * 8 * 2  # order and its inverse
    t["ffn.routed.in"] = rows * h * a
    if o.ep > 1 and E // o.ep > 1:  # received rows reordered by local expert (and back)
        t["ffn.routed.reorder"] = rows * (8 + h * a)
    swiglu = 2 if "moe_act" in mods else (6 if cfg.swiglu_limit > 0 else 4)  # gate, up (+ 2 clamps), silu, product
    t["ffn.routed.act"] = rows * swiglu * I / o.etp * a
    t["ffn.combine"] = own * k * (h * F32 + F32)  # the expert outputs and weights, in fp32
    if shared and "shared_experts" not in mods:
        t["ffn.shared"] = swiglu * shared / tp * a
    return t


def layer_terms(cfg: ModelConfig, layer_idx: int, o) -> Dict[str, float]:
    """Bytes per micro-batch token one V4 decoder layer (MTP layers: num_hidden_layers + k, without MTP's own
    projections and head) keeps for backward, no recompute or selective (full: memory.layer_activation_bytes)."""
    _, _, mods, _ = _ctx(o)
    mhc = "mhc" in mods
    t = {"mhc.attn": mixing_bytes(cfg, o, mhc), "mhc.ffn": mixing_bytes(cfg, o, mhc)}
    t["attn.norm"] = _ctx(o)[1] * (cfg.hidden_size * o.act_bytes if "layernorm" in mods else _v4_norm(cfg.hidden_size))
    t.update(attention_terms(cfg, layer_idx, o))
    t.update(ffn_terms(cfg, o))
    return t


def hc_head_bytes(cfg: ModelConfig, o) -> float:
    """A stream collapse before a head (model.hc_head, each MTP depth's own): the mixing without Sinkhorn."""
    _, loc, _, a = _ctx(o)
    n, h = cfg.hc_mult, cfg.hidden_size
    copy = n * h * F32 if a < F32 else 0
    return loc * (copy + F32 + n * h * F32 + 3 * n * F32 + n * h * a)


def mtp_extra_terms(cfg: ModelConfig, o) -> Dict[str, float]:
    """One MTP depth besides its decoder layer: enorm / e_proj on the shifted embedding, hnorm / h_proj on each
    previous stream, its hc_head and norm (and the norm's output, the head's input)."""
    _, loc, _, a = _ctx(o)
    n, h = cfg.hc_mult, cfg.hidden_size
    # hnorm's input is the previous streams, which the head before keeps: its fp32 "copy" is them in fp32
    hnorm = n * _v4_norm(h) - (n * h * F32 if a == F32 else 0) + n * h * a
    return {"mtp.enorm": loc * (_v4_norm(h) + h * a), "mtp.hnorm": loc * hnorm,
            "mtp.hc_head": hc_head_bytes(cfg, o), "mtp.norm": loc * _v4_norm(h)}


def _ce_bytes(cfg: ModelConfig, o, vocab_local: int) -> float:
    """One head's lm_head input (gathered) and vocab-parallel cross entropy: fp32 softmax of the local vocabulary,
    the local target (int64), two masks."""
    return cfg.hidden_size * o.act_bytes + vocab_local * F32 + 8 + 2


def head_bytes(cfg: ModelConfig, o, vocab_local: int, with_mtp: int) -> float:
    """Per micro-batch: the main head (hc_head, final norm, lm_head + CE) and each MTP depth's embedding ids,
    projections, hc_head, norm, head and shifted fp32 loss mask. Under full recompute an MTP depth is one
    checkpoint: its embedding input (memory.layer_activation_bytes' MTP term), after the first depth the previous
    depth's streams, and its head stay."""
    tokens = o.seq_length * o.micro_batch_size
    _, loc, _, a = _ctx(o)
    main = hc_head_bytes(cfg, o) + loc * _v4_norm(cfg.hidden_size) + _ce_bytes(cfg, o, vocab_local)
    mtp = 0.0
    for k in range(with_mtp):
        if o.recompute == "full":
            mtp += loc * cfg.hc_mult * cfg.hidden_size * a if k else 0.0  # the previous depth's streams
        else:
            mtp += sum(mtp_extra_terms(cfg, o).values())
        mtp += _ce_bytes(cfg, o, vocab_local) + 8 + F32  # + its embedding ids and loss mask
    return tokens * (main + mtp)


def embedding_bytes(cfg: ModelConfig, o) -> float:
    """The token ids the embedding lookup keeps (int64; V4 builds its RoPE tables per forward without keeping
    them; each MTP depth's own lookup is head_bytes')."""
    return o.seq_length * o.micro_batch_size * 8.0


def rope_checkpoint_bytes(cfg: ModelConfig, o, layer_ids: Iterable[int]) -> float:
    """Per micro-batch: selective ``mla_up_proj`` keeps the per-forward cos / sin tables (fp32 [s, b, r/2]) as its
    checkpoint's inputs, once per RoPE kind ("main" for sliding layers, "compress" for CSA / HCA) in the chunk."""
    if o.recompute != "selective" or "mla_up_proj" not in o.selective_modules:
        return 0.0
    kinds = {cfg.attention_type(i) == "sliding_attention" for i in layer_ids}
    return o.seq_length * o.micro_batch_size * len(kinds) * 2 * (cfg.qk_rope_head_dim // 2) * F32


def forward_estimate(cfg: ModelConfig, o) -> Dict[str, float]:
    """The planner's bytes for one whole-model chunk (every decoder layer, the MTP depths, head, embedding, RoPE
    tables), keyed by recompute.SavedTensorMeter's scopes: ``layer.{i}``, ``mtp.{k}`` (the depth's decoder layer
    plus its own norms / projections / hc_head), ``checkpoint`` (under full recompute: what the checkpointed
    layers and MTP depths keep) and ``total`` (the whole forward). tests/test_planner_v4.py and
    bench/v4_memory.py compare it with the meter."""
    from . import memory
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    out = {f"layer.{i}": memory.layer_activation_bytes(cfg, i, o) for i in range(L)}
    mtp_layer = memory.layer_activation_bytes(cfg, L, o, True)
    layers = sum(out.values()) + D * mtp_layer
    out["checkpoint"] = layers
    for k in range(D):
        out[f"mtp.{k}"] = mtp_layer + o.seq_length * o.micro_batch_size * sum(mtp_extra_terms(cfg, o).values())
    out["total"] = (layers + memory.head_activation_bytes(cfg, o, cfg.vocab_size, D)
                    + memory.embedding_activation_bytes(o, cfg) + rope_checkpoint_bytes(cfg, o, range(L + D)))
    return out
