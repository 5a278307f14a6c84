"""Per-device memory: model states (exact) and activations (a per-layer analytic model).

Model states per rank = params x (param bytes + grad bytes) + (main params + optimizer states) bytes, the
last two divided over the data-parallel group with the distributed optimizer (dense params over dp, expert
params over expert-dp). Default precision = Megatron bf16 mixed precision: bf16 params, fp32 grad buffer,
fp32 main params, fp32 Adam m and v: 2 + 4 + (4 + 8) / d bytes per parameter.

Activations: ``layer_activation_bytes`` sums, per decoder layer and micro-batch, the tensors autograd keeps
for backward in a plain-PyTorch DeepSeek layer (MLA + MoE, or dense MLP), term by term (see TERMS below) as a
function of s, b, h, heads, head dims, top-k, TP / SP and recompute; DeepSeek-V4 layers (mHC streams, sliding /
CSA / HCA attention, V4 MoE), heads and MTP depths are memory_v4's. Each term names the tensor it stands for,
so a measurement with a saved-tensor meter can be compared term by term. The pipeline schedule multiplies
one micro-batch's stage activations by the number of micro-batches in flight on the stage (1F1B: p - rank;
interleaved: Megatron's warm-up count).

Does not own: parameter counts (params.py), time (step_time.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..config import ModelConfig
from . import memory_v4
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


def model_state_bytes(count: ParamCount, prec: Precision, dp: int, edp: int, distributed_optimizer: bool,
                      dense_padding: int = 0, expert_padding: int = 0,
                      fp32_params: Optional[int] = None) -> ModelStateBytes:
    """Exact bytes of params, grads, fp32 main params and Adam states held by one rank.

    ``fp32_params``: dense params kept in fp32 under bf16 (default ``count.fp32``: the router weights, which the
    trainer keeps fp32 as DeepSeek does, and V4's mHC parameters and V4RMSNorm weights; they are their own main
    params). ``*_padding``: elements the distributed
    optimizer's buckets add to the param and grad buffers (read them from the live buffers for an exact match;
    0 for planning). Main params and optimizer states cover 1/d of the real elements on average: a rank's exact
    share depends on where the bucket padding falls, their sum over the group is exact."""
    n = count.total
    f32 = count.fp32 if fp32_params is None else fp32_params
    if prec.param == 4:
        f32 = 0
    pad = dense_padding + expert_padding if distributed_optimizer else 0
    params = (n - f32) * prec.param + f32 * 4 + (dense_padding * prec.param + expert_padding * prec.param
                                                 if distributed_optimizer else 0)
    grads = (n + pad) * prec.grad
    if distributed_optimizer:  # each dp rank owns 1/d of the real elements (padding owns no state)
        owned = count.dense / dp + count.expert / edp
        owned_f32 = f32 / dp
    else:
        owned, owned_f32 = n, f32
    main = (owned - owned_f32) * prec.main_param
    return ModelStateBytes(params=int(params), grads=int(grads), main_params=int(round(main)),
                           optim=int(round(owned * prec.optim)))


# ------------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------------
RECOMPUTE_CHOICES = ("none", "selective", "full")
# what "selective" recomputes in the planner: DeepSeek-V3's choice (norms, MLA up-projections) plus the MoE
# SwiGLU (Megatron's moe_act). Each module frees what recompute.py frees in this library (measured with its
# SavedTensorMeter): "layernorm" each pre-norm's output, its flattened copy and 1/rms (the input stays);
# "mla_up_proj" q / k / v (output-discarding, rebuilt from the latents; they stay when "core_attn" is also
# recomputed, as that checkpoint keeps them as inputs); "core_attn" the s x s probabilities of math attention or
# the log-sum-exp of fused attention; "moe_act" half of the routed and shared SwiGLU tensors; "shared_experts"
# the shared expert; "mlp" the dense SwiGLU; "moe" the whole MoE block but its input.
SELECTIVE_MODULES = ("layernorm", "mla_up_proj", "moe_act")
# DeepSeek-V4's: the same plus "mhc" (the mixing coefficients, recomputed from the streams each mixing keeps
# anyway; the largest per-token saving of a V4 layer: docs/V4.md)
SELECTIVE_MODULES_V4 = ("layernorm", "mhc", "mla_up_proj", "moe_act")


def selective_modules(cfg: ModelConfig) -> Tuple[str, ...]:
    """What the planner's "selective" recomputes for this model."""
    return SELECTIVE_MODULES_V4 if cfg.model_type == "deepseek_v4" else SELECTIVE_MODULES


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


def _causal_keys_per_query(s: int) -> float:
    """Mean number of keys whose probability the causal math path keeps per query (its query blocks)."""
    from ..models.deepseek.attention import causal_query_blocks
    return sum((e - a) * e for a, e in causal_query_blocks(s)) / s


def _mla_terms(cfg: ModelConfig, o: ActivationOptions) -> Dict[str, float]:
    """Bytes saved per micro-batch token by one MLA sublayer of models/deepseek/attention.py (calibrated with a
    saved-tensor meter on CPU: see tests/test_planner_memory.py)."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    nl = n / o.tp
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    sp_div = o.tp if o.sp else 1
    a, st = o.act_bytes, o.norm_stats_bytes
    s = o.seq_length
    mods = set(o.selective_modules) if o.recompute == "selective" else set()
    q_in = cfg.q_lora_rank or h
    t: Dict[str, float] = {}
    # RMSNorm keeps its input and fp32 1/rms; its output and the linear's flattened input copy on local tokens
    t["attn.input_norm"] = h * a / sp_div + (0 if "layernorm" in mods else (2 * h * a + st) / sp_div)
    if cfg.q_lora_rank:
        t["attn.q_a_norm"] = (2 * cfg.q_lora_rank * a + st) / sp_div  # q_a output and its norm
    t["attn.kv_a_norm"] = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * a + cfg.kv_lora_rank * a + st) / sp_div
    t["attn.latent"] = (q_in + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * a  # [c_q | c_kv | k_pe], gathered
    dropped = "mla_up_proj" in mods and "core_attn" not in mods
    t["attn.qkv"] = 0.0 if dropped else nl * (qk + qk + cfg.v_head_dim) * a
    if o.flash_attention:
        # output (o_proj input) + fp32 log-sum-exp per head
        t["attn.core"] = nl * cfg.v_head_dim * a + (0 if "core_attn" in mods else nl * 4)
    else:  # math attention keeps the probabilities of its causal query blocks (attention.causal_query_blocks)
        t["attn.core"] = (0 if "core_attn" in mods else nl * _causal_keys_per_query(s) * a) + nl * cfg.v_head_dim * a
    if cfg.has_indexer:
        nh, d = cfg.index_n_heads / o.tp, cfg.index_head_dim
        t["attn.indexer"] = (nh * d + d + nh) * a  # indexer q, its shared k, head weights
    return t


def _ffn_terms(cfg: ModelConfig, o: ActivationOptions, moe: bool) -> Dict[str, float]:
    """Bytes saved per micro-batch token by the FFN sublayer (dense SwiGLU, or moe/ MoELayer with the
    all-to-all dispatcher: router, the inverse permutation, permuted rows, grouped SwiGLU, weighted combine)."""
    h = cfg.hidden_size
    sp_div = o.tp if o.sp else 1
    a, st = o.act_bytes, o.norm_stats_bytes
    mods = set(o.selective_modules) if o.recompute == "selective" else set()
    t: Dict[str, float] = {}
    t["ffn.norm"] = h * a / sp_div + (0 if "layernorm" in mods else (2 * h * a + st) / sp_div)
    swiglu = 2 if "moe_act" in mods else 4  # gate out, up out, silu(gate), product (down input)
    if not moe:
        t["ffn.dense"] = 0.0 if "mlp" in mods else 4 * cfg.intermediate_size / o.tp * a
        return t
    if "moe" in mods:
        return t
    E, k, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    # each TP rank routes its own 1/tp of the tokens (moe_layer._token_chunk); with expert-TP the etp group
    # gathers its ranks' tokens so every etp rank computes an I/etp slice of etp x as many rows
    own = 1.0 / o.tp
    rows = own * k * o.etp
    t["ffn.router"] = own * (E * 4 + k * 8 + 4 + k * 4)  # fp32 scores, top-k ids, normaliser, weights
    t["ffn.sort"] = own * k * 8  # the inverse permutation of the n*k assignment rows (int64)
    if cfg.n_shared_experts and "shared_experts" not in mods:
        t["ffn.shared"] = swiglu * cfg.n_shared_experts * I / o.tp * a
    t["ffn.routed.in"] = rows * h * a  # permuted token rows (expert gate/up input)
    t["ffn.routed.act"] = rows * swiglu * I / o.etp * a
    t["ffn.routed.out"] = rows * (h * a + 4)  # expert output and the fp32 weight (saved by weight * y)
    return t


def layer_activation_terms(cfg: ModelConfig, layer_idx: int, o: ActivationOptions,
                           mtp_block: bool = False) -> Dict[str, float]:
    """Bytes per micro-batch token saved for backward by one decoder layer (no recompute / selective). V4's MTP
    layer k is global layer num_hidden_layers + k (its extra projections and head: head_activation_bytes)."""
    if cfg.model_type == "deepseek_v4":
        return memory_v4.layer_terms(cfg, layer_idx, o)
    t = _mla_terms(cfg, o)
    moe = cfg.is_moe_layer(cfg.num_hidden_layers - 1 if mtp_block else layer_idx)
    t.update(_ffn_terms(cfg, o, moe))
    return t


def layer_activation_bytes(cfg: ModelConfig, layer_idx: int, o: ActivationOptions, mtp_block: bool = False) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch (full recompute: only its checkpoint's
    inputs: a decoder layer's input, V4's its n streams; an MTP depth is one checkpoint of the shifted embedding
    and what the depth before passes on: V3 both are new tensors (depth 1 reads the final-normed hidden, which
    the main head's norm does not keep), V4 the embedding only (depth 1 reads the main streams, which hc_head
    keeps; a later depth's streams are head_activation_bytes')."""
    tokens = o.seq_length * o.micro_batch_size
    if o.recompute == "full":
        sp_div = o.tp if o.sp else 1
        if cfg.model_type == "deepseek_v4":
            m = 1 if mtp_block else max(cfg.hc_mult, 1)
        else:
            m = 2 if mtp_block else 1
        return tokens * m * cfg.hidden_size * o.act_bytes / sp_div
    return tokens * sum(layer_activation_terms(cfg, layer_idx, o, mtp_block).values())


def head_activation_bytes(cfg: ModelConfig, o: ActivationOptions, vocab_local: int, with_mtp: int) -> float:
    """Final norm + output head + vocab-parallel CE (fp32 softmax of the local vocab slice, local target, masks),
    once per head (main + each MTP depth), plus each MTP depth's enorm / hnorm / eh_proj inputs. Under full
    recompute the MTP block (its norms, projection and final norm) is one checkpoint: only its head remains (the
    checkpoint's inputs are layer_activation_bytes(..., mtp_block=True)'s)."""
    if cfg.model_type == "deepseek_v4":
        return memory_v4.head_bytes(cfg, o, vocab_local, with_mtp)
    tokens = o.seq_length * o.micro_batch_size
    h = cfg.hidden_size
    sp_div = o.tp if o.sp else 1
    a, st = o.act_bytes, o.norm_stats_bytes
    ce = h * a + vocab_local * 4 + 8 + 2 + 8  # head input (gathered), softmax, local target, masks, labels
    main = (2 * h * a + st) / sp_div + ce + 4  # final norm in / out + 1/rms; + the fp32 loss mask
    if o.recompute == "full":
        mtp = ce
    else:
        mtp = (2 * h * a + st) / sp_div + ce + (2 * (2 * h * a + st) + 2 * h * a) / sp_div
    return tokens * (main + mtp * with_mtp)


def embedding_activation_bytes(o: ActivationOptions, cfg: Optional[ModelConfig] = None) -> float:
    """Token ids for the embedding backward (int64) and the fp32 RoPE cos / sin tables shared by all layers (V4:
    the ids only, memory_v4.embedding_bytes)."""
    if cfg is not None and cfg.model_type == "deepseek_v4":
        return memory_v4.embedding_bytes(cfg, o)
    rope = cfg.qk_rope_head_dim * 4 if cfg is not None else 0
    return o.seq_length * o.micro_batch_size * (8.0 + rope)


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
