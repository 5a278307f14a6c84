"""Per-device memory: model states (exact) and activations (a per-layer analytic model).

Model states per rank = params x (param bytes + grad bytes) + (main params + optimizer states) bytes, the
last two divided over the data-parallel group with the distributed optimizer (dense params over dp, expert
params over expert-dp). Default precision = Megatron bf16 mixed precision: bf16 params, fp32 grad buffer,
fp32 main params, fp32 Adam m and v: 2 + 4 + (4 + 8) / d bytes per parameter.

Activations: ``layer_activation_bytes`` sums, per decoder layer and micro-batch, the tensors autograd keeps
for backward in a plain-PyTorch DeepSeek layer (MLA + MoE, or dense MLP), term by term (see TERMS below) as a
function of s, b, h, heads, head dims, top-k, TP / SP and recompute. Each term names the tensor it stands for,
so a measurement with a saved-tensor meter can be compared term by term. The pipeline schedule multiplies
one micro-batch's stage activations by the number of micro-batches in flight on the stage (1F1B: p - rank;
interleaved: Megatron's warm-up count).

Does not own: parameter counts (params.py), time (step_time.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

from ..config import ModelConfig
from .params import ParamCount

GIB = 1024 ** 3


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for each model state, and bytes per activation element."""

    param: int = 2  # model params (bf16)
    grad: int = 4  # grad buffer (fp32, grad_reduce_in_fp32)
    main_param: int = 4  # fp32 master copy (0 when the params are fp32 already)
    optim: int = 8  # Adam exp_avg + exp_avg_sq (fp32); 4 for DeepSeek-V3's bf16 moments
    activation: int = 2  # bf16 activations

    @classmethod
    def named(cls, name: str) -> "Precision":
        table = {
            "bf16": cls(),
            "bf16-bf16moments": cls(optim=4),  # DeepSeek-V3 report: AdamW moments in BF16
            "fp32": cls(param=4, grad=4, main_param=0, optim=8, activation=4),
        }
        if name not in table:
            raise ValueError(f"precision {name!r} is unknown; use one of {', '.join(table)}")
        return table[name]


def _shard(n: int, d: int) -> int:
    return -(-n // d)  # ceil: the distributed optimizer pads its buffer to a multiple of d


@dataclass
class ModelStateBytes:
    params: int
    grads: int
    main_params: int
    optim: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.main_params + self.optim

    def as_dict(self) -> Dict[str, int]:
        return {"params": self.params, "grads": self.grads, "main_params": self.main_params,
                "optimizer": self.optim, "total": self.total}


def model_state_bytes(count: ParamCount, prec: Precision, dp: int, edp: int,
                      distributed_optimizer: bool) -> ModelStateBytes:
    """Exact bytes of params, grads, fp32 main params and Adam states held by one rank."""
    n = count.total
    if distributed_optimizer:
        owned = _shard(count.dense, dp) + _shard(count.expert, edp)
    else:
        owned = n
    return ModelStateBytes(params=n * prec.param, grads=n * prec.grad, main_params=owned * prec.main_param,
                           optim=owned * prec.optim)


# ------------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------------
RECOMPUTE_CHOICES = ("none", "selective", "full")
# what "selective" recomputes in the planner (DeepSeek-V3 report: norms and MLA up-projections; plus the
# MoE SwiGLU activation, Megatron's moe_act)
SELECTIVE_MODULES = ("layernorm", "mla_up_proj", "moe_act")


@dataclass(frozen=True)
class ActivationOptions:
    seq_length: int
    micro_batch_size: int = 1
    tp: int = 1
    sp: bool = False
    ep: int = 1
    etp: int = 1
    recompute: str = "none"  # none | selective | full
    selective_modules: Tuple[str, ...] = SELECTIVE_MODULES
    flash_attention: bool = True  # fused attention keeps q, k, v, out and the row log-sum-exp, no s x s probs
    act_bytes: int = 2
    norm_stats_bytes: int = 4  # fp32 rstd per row


def _mla_terms(cfg: ModelConfig, o: ActivationOptions) -> Dict[str, float]:
    """Saved elements (x bytes) per token of one MLA sublayer, per micro-batch token."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    nl = n / o.tp
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    sp_div = o.tp if o.sp else 1
    a, st = o.act_bytes, o.norm_stats_bytes
    s = o.seq_length
    mods = set(o.selective_modules) if o.recompute == "selective" else set()
    t: Dict[str, float] = {}
    t["attn.input_norm.in"] = h * a / sp_div + st / sp_div
    if "layernorm" not in mods:
        t["attn.input_norm.out"] = h * a  # input of q_a_proj / kv_a_proj (gathered under SP)
    else:
        t["attn.input_norm.out"] = 0.0
    if cfg.q_lora_rank:
        t["attn.q_a_norm"] = cfg.q_lora_rank * a * 2 + st  # q_a output (norm input) and norm output (q_b input)
    t["attn.kv_a_norm"] = cfg.kv_lora_rank * a * 2 + st  # c_kv and its norm output (kv_b input)
    t["attn.k_pe"] = cfg.qk_rope_head_dim * a  # rotated shared key part
    if "mla_up_proj" not in mods:
        t["attn.qkv"] = nl * (qk + qk + cfg.v_head_dim) * a  # q, k (nope+rope per head), v
    else:
        t["attn.qkv"] = 0.0
    if o.flash_attention:
        t["attn.core"] = nl * cfg.v_head_dim * a + nl * 4  # output (o_proj input) + fp32 log-sum-exp per head
    else:
        keys = s if "core_attn" not in mods else 0
        t["attn.core"] = nl * keys * a + nl * cfg.v_head_dim * a  # s x s probabilities + output
    if cfg.has_indexer:
        nh, d = cfg.index_n_heads, cfg.index_head_dim
        t["attn.indexer"] = (nh * d + d + nh) * a  # indexer q, its shared k, head weights
    return t


def _v4_attention_terms(cfg: ModelConfig, o: ActivationOptions, ratio: int) -> Dict[str, float]:
    """V4 attention (approximate; §6.3): q per head (head_dim), one shared kv, output, grouped o_a out, mHC."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    hd = cfg.head_dim or (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    nl = n / o.tp
    a, st = o.act_bytes, o.norm_stats_bytes
    m = max(cfg.hc_mult, 1)
    q_lora = cfg.q_lora_rank or h
    t: Dict[str, float] = {}
    t["attn.hc"] = m * h * a + m * h * 4  # the m residual streams (fp32 for the mixing) + sublayer input
    t["attn.input_norm"] = h * a * 2 + st
    t["attn.q_lora"] = q_lora * a * 2 + st
    t["attn.qkv"] = (nl * hd + hd) * a * (0 if o.recompute == "selective" else 1) + nl * hd * a
    t["attn.core"] = nl * hd * a + nl * 4
    t["attn.o_lora"] = (cfg.o_groups or 1) / o.tp * (cfg.o_lora_rank or h) * a
    if ratio:
        overlap = 2 if ratio == 4 else 1
        t["attn.compressor"] = 2 * overlap * hd * a
        if ratio == 4 and cfg.index_topk:
            t["attn.indexer"] = (cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_head_dim) * a
    return t


def _ffn_terms(cfg: ModelConfig, o: ActivationOptions, moe: bool) -> Dict[str, float]:
    h = cfg.hidden_size
    sp_div = o.tp if o.sp else 1
    a, st = o.act_bytes, o.norm_stats_bytes
    mods = set(o.selective_modules) if o.recompute == "selective" else set()
    t: Dict[str, float] = {}
    t["ffn.norm.in"] = h * a / sp_div + st / sp_div
    t["ffn.norm.out"] = 0.0 if "layernorm" in mods else h * a
    swiglu = 2 if "moe_act" in mods else 4  # gate out, up out, silu(gate), product (down input)
    if not moe:
        t["ffn.dense"] = swiglu * cfg.intermediate_size / o.tp * a
        return t
    E, k, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    t["ffn.router"] = E * 4 * 2 + k * 4 * 2  # fp32 logits -> scores, top-k weights and their normalisation
    if cfg.n_shared_experts:
        t["ffn.shared"] = swiglu * cfg.n_shared_experts * I / o.tp * a
    # routed: each token is copied k times (dropless); with TP > 1 and ETP 1 each TP rank dispatches its
    # 1/tp share of the tokens, so the per-rank count is T k / tp in expectation
    tok = k / o.tp * (o.tp / o.etp if o.etp > 1 else 1)
    t["ffn.routed.in"] = tok * h * a  # permuted tokens (expert gate/up input)
    t["ffn.routed.act"] = tok * swiglu * I / o.etp * a
    t["ffn.routed.out"] = tok * (h * a + 4)  # down output scaled by its fp32 routing weight
    return t


def layer_activation_terms(cfg: ModelConfig, layer_idx: int, o: ActivationOptions,
                           mtp_block: bool = False) -> Dict[str, float]:
    """Bytes per micro-batch token saved for backward by one decoder layer (no recompute / selective)."""
    if cfg.model_type == "deepseek_v4":
        ratio = 0 if mtp_block else (cfg.compress_ratios[layer_idx] if layer_idx < len(cfg.compress_ratios) else 0)
        t = _v4_attention_terms(cfg, o, ratio)
        t.update(_ffn_terms(cfg, o, True))
        return t
    t = _mla_terms(cfg, o)
    moe = cfg.is_moe_layer(cfg.num_hidden_layers - 1 if mtp_block else layer_idx)
    t.update(_ffn_terms(cfg, o, moe))
    return t


def layer_activation_bytes(cfg: ModelConfig, layer_idx: int, o: ActivationOptions, mtp_block: bool = False) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch (full recompute: only its input)."""
    tokens = o.seq_length * o.micro_batch_size
    if o.recompute == "full":
        sp_div = o.tp if o.sp else 1
        m = max(cfg.hc_mult, 1) if cfg.model_type == "deepseek_v4" else 1
        return tokens * m * cfg.hidden_size * o.act_bytes / sp_div
    return tokens * sum(layer_activation_terms(cfg, layer_idx, o, mtp_block).values())


def head_activation_bytes(cfg: ModelConfig, o: ActivationOptions, vocab_local: int, with_mtp: int) -> float:
    """Final norm + output head + fp32 softmax for the loss, once per head (main + each MTP depth)."""
    tokens = o.seq_length * o.micro_batch_size
    h = cfg.hidden_size
    sp_div = o.tp if o.sp else 1
    per_head = (h * o.act_bytes / sp_div + o.norm_stats_bytes / sp_div + h * o.act_bytes
                + vocab_local * 4)  # norm in, head input (gathered), fp32 softmax of the local vocab slice
    mtp_extra = (2 * h * o.act_bytes * 2 + 2 * h * o.act_bytes)  # enorm/hnorm in+out, eh_proj input
    return tokens * (per_head * (1 + with_mtp) + mtp_extra * with_mtp)


def embedding_activation_bytes(o: ActivationOptions) -> float:
    """Token ids kept for the embedding backward (int64)."""
    return o.seq_length * o.micro_batch_size * 8.0


def inflight_microbatches(pp: int, vp: int, rank: int, m: int) -> float:
    """Micro-batch activations a stage holds at its peak, in units of the whole stage's layers.

    1F1B: min(p - rank, m). Interleaved (v chunks): Megatron warms up (p - rank - 1) * 2 + (v - 1) * p chunk
    forwards, then holds one more, each chunk being 1/v of the stage."""
    if vp <= 1:
        return float(min(pp - rank, m))
    chunks = min((pp - rank - 1) * 2 + (vp - 1) * pp + 1, m * vp)
    return chunks / vp


def bytes_to_gib(b: float) -> float:
    return b / GIB
