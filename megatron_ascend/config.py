"""Configuration dataclasses and every cross-field validation rule.

Owns: ModelConfig (one type for DeepSeek V2 / V2-Lite / V3 / V3.2 / V4, readable from a HuggingFace
``config.json`` in both the hub style (``rope_scaling`` + ``rope_theta``) and the newer ``transformers``
style (``rope_parameters``)), ParallelConfig, OptimizerConfig, TrainingConfig, DataConfig, and
``validate_all`` which checks the rules that span several of them.

Does not own: flag parsing (arguments.py), process groups (parallel_state.py).

Every rule raises ``ConfigError`` with one sentence that names the value(s) seen and the fix.
The dataclasses are frozen: build a new one with ``dataclasses.replace`` instead of mutating.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "moe_act", "layernorm", "mlp", "moe", "shared_experts", "mhc")
DISPATCHER_TYPES = ("alltoall", "allgather")
LOAD_BALANCING_TYPES = ("seq_aux_loss", "aux_loss", "none")


class ConfigError(ValueError):
    """A configuration value (or combination) that cannot work. The message names the value and the fix."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters exactly as the released configs define them (see deepseek_architecture.md 1.3)."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _require(self.type in ("yarn",), f"rope scaling type {self.type!r} is not supported; use 'yarn' or none")
        _require(self.factor >= 1.0, f"rope scaling factor {self.factor} must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """One DeepSeek family config. Field names follow the HuggingFace config.json keys."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: Optional[int] = 1536  # None (or 0) = V2-Lite form with a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # MoE (n_routed_experts == 0 means a dense model)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss coefficient (V3 paper: 1e-4)
    seq_aux: bool = True
    # MoE training options (Megatron names; checked by moe.MoELayer): balance loss kind (one of
    # LOAD_BALANCING_TYPES, coefficient aux_loss_alpha), router z-loss coefficient, and the expert
    # capacity factor (None = dropless; with a factor, tokens over capacity are dropped by probability)
    moe_router_load_balancing_type: str = "seq_aux_loss"
    moe_z_loss_coeff: float = 0.0
    moe_expert_capacity_factor: Optional[float] = None
    # norms / positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # init
    init_method_std: float = 0.006
    # V3.2 DSA lightning indexer (index_topk == 0: off)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    dsa_indexer_loss_coeff: float = 0.0
    # V4 (models/deepseek_v4; docs/V4.md). compress_ratios: one entry per layer (and optionally per MTP layer
    # after them, as the released config.json lists them): 0 = sliding window only, csa_compress_ratio =
    # compressed sparse attention (overlapping windows + lightning indexer), any other ratio = heavily
    # compressed attention. rope_scaling is the YaRN of the compressed layers (rope base compress_rope_theta);
    # sliding-only layers use plain RoPE at rope_theta. The first num_hash_layers MoE layers route by tid2eid.
    hc_mult: int = 0
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    head_dim: int = 0
    sliding_window: int = 0
    compress_ratios: Tuple[int, ...] = ()
    compress_rope_theta: float = 0.0
    csa_compress_ratio: int = 4
    o_groups: int = 0
    o_lora_rank: int = 0
    num_hash_layers: int = 0
    swiglu_limit: float = 0.0
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        if self.q_lora_rank == 0:
            object.__setattr__(self, "q_lora_rank", None)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        self.validate()

    # -- derived ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF remote-code rule: MoE iff experts exist, idx >= first_k_dense_replace and idx % freq == 0."""
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def compress_ratio(self, layer_idx: int) -> int:
        """V4: the compression ratio of layer ``layer_idx`` (an MTP layer is ``num_hidden_layers + k``); layers the
        config lists no ratio for (MTP layers of a transformers-style config) are sliding-only, as in DeepSeek's
        released configs."""
        return self.compress_ratios[layer_idx] if layer_idx < len(self.compress_ratios) else 0

    def attention_type(self, layer_idx: int) -> str:
        """V4 attention kind of a layer, in transformers' names: sliding_attention, compressed_sparse_attention
        (ratio == csa_compress_ratio) or heavily_compressed_attention."""
        r = self.compress_ratio(layer_idx)
        if r == 0:
            return "sliding_attention"
        return "compressed_sparse_attention" if r == self.csa_compress_ratio else "heavily_compressed_attention"

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def validate(self) -> None:
        _require(self.model_type in MODEL_TYPES,
                 f"model_type {self.model_type!r} is unknown; use one of {', '.join(MODEL_TYPES)}")
        for name, flag in (("vocab_size", "--vocab-size"), ("hidden_size", "--hidden-size"),
                           ("num_hidden_layers", "--num-layers"), ("num_attention_heads", "--num-attention-heads"),
                           ("kv_lora_rank", "--kv-lora-rank"), ("qk_rope_head_dim", "--qk-pos-emb-head-dim"),
                           ("v_head_dim", "--v-head-dim")):
            _require(getattr(self, name) > 0, f"{name} (flag {flag}) is {getattr(self, name)}; it must be a positive "
                                              f"integer: pass {flag} >= 1 or fix config.json")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim {self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        _require(self.scoring_func in SCORING_FUNCS,
                 f"unknown router scoring function {self.scoring_func!r}; use one of {', '.join(SCORING_FUNCS)}")
        _require(self.topk_method in TOPK_METHODS,
                 f"unknown router type (topk_method) {self.topk_method!r}; use one of {', '.join(TOPK_METHODS)}")
        if self.is_moe:
            _require(self.num_experts_per_tok >= 1,
                     f"num_experts_per_tok {self.num_experts_per_tok} must be >= 1 for a MoE model")
            _require(self.num_experts_per_tok <= self.n_routed_experts,
                     f"num_experts_per_tok {self.num_experts_per_tok} exceeds n_routed_experts "
                     f"{self.n_routed_experts}; pick at most {self.n_routed_experts}")
            _require(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for a MoE model")
            _require(self.moe_layer_freq >= 1, f"moe_layer_freq {self.moe_layer_freq} must be >= 1")
            if self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1:
                _require(self.n_routed_experts % self.n_group == 0,
                         f"n_group {self.n_group} does not divide n_routed_experts {self.n_routed_experts}; "
                         f"pick a divisor of {self.n_routed_experts}")
                _require(1 <= self.topk_group <= self.n_group,
                         f"topk_group {self.topk_group} must be between 1 and n_group {self.n_group}")
                per_group = self.n_routed_experts // self.n_group
                _require(self.topk_group * per_group >= self.num_experts_per_tok,
                         f"topk_group {self.topk_group} groups of {per_group} experts cannot hold "
                         f"num_experts_per_tok {self.num_experts_per_tok}; raise topk_group")
                if self.topk_method == "noaux_tc":
                    _require(per_group >= 2 or self.n_group == 1,
                             f"noaux_tc scores a group by its top-2 experts, but n_group {self.n_group} leaves "
                             f"{per_group} expert per group; use fewer groups")
        if self.has_indexer:
            _require(self.index_n_heads > 0 and self.index_head_dim > 0,
                     "index_topk > 0 needs index_n_heads and index_head_dim > 0")
            _require(self.index_head_dim >= self.qk_rope_head_dim,
                     f"index_head_dim {self.index_head_dim} must be >= qk_rope_head_dim {self.qk_rope_head_dim}")
        _require(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        if self.model_type == "deepseek_v4":
            self._validate_v4()

    def _validate_v4(self) -> None:
        L, D = self.num_hidden_layers, self.num_nextn_predict_layers
        for name in ("hc_mult", "hc_sinkhorn_iters", "head_dim", "o_groups", "o_lora_rank", "sliding_window"):
            _require(getattr(self, name) >= 1, f"deepseek_v4 needs {name} >= 1 (it is {getattr(self, name)}); "
                                               f"set it in config.json")
        _require(self.q_lora_rank is not None, "deepseek_v4 needs q_lora_rank > 0 (its queries are low-rank)")
        _require(self.qk_rope_head_dim <= self.head_dim,
                 f"qk_rope_head_dim {self.qk_rope_head_dim} exceeds head_dim {self.head_dim}; RoPE covers the last "
                 f"qk_rope_head_dim dims of a head")
        _require(self.num_attention_heads % self.o_groups == 0,
                 f"o_groups {self.o_groups} does not divide num_attention_heads {self.num_attention_heads}; pick a "
                 f"divisor")
        _require(len(self.compress_ratios) in (0, L, L + D),
                 f"compress_ratios has {len(self.compress_ratios)} entries; give one per layer ({L}) or per layer and "
                 f"MTP layer ({L + D})")
        _require(all(r == 0 or r >= 2 for r in self.compress_ratios),
                 f"compress_ratios {list(self.compress_ratios)} must be 0 (sliding window only) or >= 2")
        _require(self.csa_compress_ratio >= 2, f"csa_compress_ratio {self.csa_compress_ratio} must be >= 2")
        if any(self.attention_type(i) == "compressed_sparse_attention" for i in range(L + D)):
            _require(self.index_topk > 0 and self.index_n_heads > 0 and self.index_head_dim > 0,
                     "deepseek_v4 compressed sparse attention layers need index_n_heads, index_head_dim and "
                     "index_topk > 0")
        _require(self.is_moe, "deepseek_v4 layers are all MoE; set n_routed_experts > 0")
        _require(self.first_k_dense_replace == 0 and self.moe_layer_freq == 1,
                 f"deepseek_v4 has no dense-MLP layers (first_k_dense_replace {self.first_k_dense_replace}, "
                 f"moe_layer_freq {self.moe_layer_freq}); set them to 0 and 1")
        _require(0 <= self.num_hash_layers <= L,
                 f"num_hash_layers {self.num_hash_layers} must be between 0 and num_hidden_layers {L}")

    # -- HuggingFace config.json ------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any], **overrides) -> "ModelConfig":
        """Build from a HuggingFace DeepSeek config dict (hub style or transformers-5 style), or from DeepSeek-V4's
        inference ``config.json`` (``ModelArgs`` keys: dim, n_layers, n_heads, ...)."""
        d = dict(d)
        if "model_type" not in d and _is_v4_inference_args(d):
            d = _v4_inference_args_to_hf(d)
        model_type = d.get("model_type")
        if model_type is None:
            arch = " ".join(d.get("architectures") or [])
            model_type = "deepseek_v4" if ("DeepseekV4" in arch or "hc_mult" in d) else "deepseek_v3"
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not a DeepSeek model we support; "
                              f"use one of {', '.join(MODEL_TYPES)}")
        if float(d.get("attention_dropout") or 0.0) != 0.0:
            raise ConfigError(f"config.json sets attention_dropout {d['attention_dropout']}; dropout is not "
                              f"implemented (DeepSeek trains without it): set it to 0.0")
        kw: Dict[str, Any] = {"model_type": model_type}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in names and k not in ("rope_scaling", "model_type", "compress_ratios"):
                kw[k] = v
        # rope: hub style {rope_theta, rope_scaling{type|rope_type, ...}} or rope_parameters
        rope = d.get("rope_parameters")
        scaling = d.get("rope_scaling")
        if isinstance(rope, dict) and "main" in rope:  # V4: per-attention-kind parameters (transformers style)
            main, comp = rope.get("main") or {}, rope.get("compress") or {}
            if "rope_theta" in comp:
                kw.setdefault("compress_rope_theta", float(comp["rope_theta"]))
            if "rope_theta" in main:
                kw["rope_theta"] = float(main["rope_theta"])
            # only the compressed layers are YaRN-scaled in V4 (both references); ModelConfig.rope_scaling is theirs
            if scaling is None and comp.get("rope_type", comp.get("type", "default")) not in ("default", None):
                scaling = comp
            rope = None
        if rope is not None and scaling is None:
            if "rope_theta" in rope:
                kw["rope_theta"] = float(rope["rope_theta"])
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                scaling = rope
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype not in (None, "default"):
                kw["rope_scaling"] = RopeScaling(
                    type=rtype, factor=float(scaling.get("factor", 1.0)),
                    original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(scaling.get("beta_fast", 32)), beta_slow=float(scaling.get("beta_slow", 1)),
                    mscale=float(scaling.get("mscale", 1.0)), mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)))
        if "rope_theta" in d:
            kw["rope_theta"] = float(d["rope_theta"])
        # family defaults that HF configs leave implicit
        if model_type == "deepseek_v3" or model_type == "deepseek_v32":
            kw.setdefault("scoring_func", "sigmoid")
            kw.setdefault("topk_method", "noaux_tc")
        if model_type == "deepseek_v2":
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("num_nextn_predict_layers", 0)
        if model_type == "deepseek_v4":
            _v4_fields_from_hf(d, kw)
        for key in ("n_group", "topk_group"):
            if kw.get(key) is None:
                kw[key] = 1
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        if kw.get("num_experts_per_tok") is None:
            kw["num_experts_per_tok"] = 0 if not kw.get("n_routed_experts") else 1
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        if "aux_loss_alpha" not in d and "router_aux_loss_coef" in d:
            kw["aux_loss_alpha"] = 0.0  # HF V4 key is an inference-time default; training sets its own alpha
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str, **overrides) -> "ModelConfig":
        if not os.path.isfile(path):
            raise ConfigError(f"--model-config {path!r} does not exist; pass the path of a HuggingFace config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-config {path!r} is not valid JSON ({e}); pass a HuggingFace config.json")
        return cls.from_hf_dict(d, **overrides)

    def to_hf_dict(self) -> Dict[str, Any]:
        """The hub-style config.json that `transformers` loads for this model."""
        if self.model_type == "deepseek_v4":
            return _v4_to_hf(self)
        arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                "deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM"}[self.model_type]
        d = {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "n_routed_experts": self.n_routed_experts or None,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.num_experts_per_tok or None,
            "n_group": self.n_group, "topk_group": self.topk_group, "topk_method": self.topk_method,
            "scoring_func": self.scoring_func, "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor, "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": self.moe_layer_freq, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers, "attention_bias": self.attention_bias,
            "hidden_act": "silu", "initializer_range": self.init_method_std,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.has_indexer:
            d.update(index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                     index_topk=self.index_topk)
        return d


# The defaults of a model family when the architecture comes from flags (no --model-config): ModelConfig's own
# defaults are DeepSeek-V3's; DeepSeek-V2's are its smallest release, V2-Lite (config.json on the hub):
# no query LoRA, softmax scores, greedy top-6 of 64 experts without expert bias or top-k normalisation,
# 2 shared experts, one dense layer, the sequence-wise balance loss with alpha 0.001, no MTP, YaRN x40.
FAMILY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "deepseek_v3": {},
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
                        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.0, first_k_dense_replace=1, aux_loss_alpha=0.001,
                        max_position_embeddings=163840, num_nextn_predict_layers=0,
                        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek_v32": dict(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048,
                         max_position_embeddings=163840),
    "deepseek_v4": dict(model_type="deepseek_v4"),
}


def family_defaults(model_type: Optional[str]) -> Dict[str, Any]:
    """ModelConfig fields a family starts from when its architecture is given by flags."""
    mt = model_type or "deepseek_v3"
    _require(mt in MODEL_TYPES, f"--model-type {mt!r} is unknown; use one of {', '.join(MODEL_TYPES)}")
    return dict(FAMILY_DEFAULTS[mt], model_type=mt)


# ----------------------------------------------------------------------------------------------
# DeepSeek-V4 config.json keys (transformers' DeepseekV4Config, the released hub config, DeepSeek's ModelArgs)
# ----------------------------------------------------------------------------------------------
_SLIDING, _CSA, _HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# transformers' DeepseekV4Config defaults, for keys a hand-written config.json leaves out
_V4_DEFAULTS = dict(hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
                    head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
                    scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
                    routed_scaling_factor=1.5, max_position_embeddings=1048576, compress_rope_theta=160000.0,
                    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8,
                    o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512,
                    num_nextn_predict_layers=1, first_k_dense_replace=0)
# DeepSeek's inference ModelArgs key -> ours (values kept); other ModelArgs keys are mapped by hand below
_V4_ARGS = {"dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
            "n_hash_layers": "num_hash_layers", "n_mtp_layers": "num_nextn_predict_layers", "n_heads":
            "num_attention_heads", "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func",
            "route_scale": "routed_scaling_factor", "rope_head_dim": "qk_rope_head_dim", "norm_eps": "rms_norm_eps",
            "window_size": "sliding_window", "vocab_size": "vocab_size", "n_routed_experts": "n_routed_experts",
            "n_shared_experts": "n_shared_experts", "swiglu_limit": "swiglu_limit", "q_lora_rank": "q_lora_rank",
            "head_dim": "head_dim", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
            "compress_ratios": "compress_ratios", "compress_rope_theta": "compress_rope_theta",
            "rope_theta": "rope_theta", "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim",
            "index_topk": "index_topk", "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters",
            "hc_eps": "hc_eps"}


def _is_v4_inference_args(d: Dict[str, Any]) -> bool:
    return "dim" in d and "n_layers" in d


def _v4_inference_args_to_hf(d: Dict[str, Any]) -> Dict[str, Any]:
    """DeepSeek-V4 inference ``config.json`` (ModelArgs) -> the hub-style keys from_hf_dict reads."""
    out: Dict[str, Any] = {"model_type": "deepseek_v4"}
    for k, v in d.items():
        if k in _V4_ARGS:
            out[_V4_ARGS[k]] = v
    out["norm_topk_prob"] = d.get("score_func", "sqrtsoftplus") != "softmax"  # ModelArgs' Gate rule
    orig = int(d.get("original_seq_len", 0) or 0)
    if orig > 0:
        factor = float(d.get("rope_factor", 1.0))
        out["rope_scaling"] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                               "beta_fast": float(d.get("beta_fast", 32)), "beta_slow": float(d.get("beta_slow", 1))}
        out["max_position_embeddings"] = int(orig * factor)
    elif "max_seq_len" in d:
        out["max_position_embeddings"] = int(d["max_seq_len"])
    return out


def _v4_fields_from_hf(d: Dict[str, Any], kw: Dict[str, Any]) -> None:
    """The V4 keys of a transformers / hub config dict into ModelConfig keyword arguments (in place)."""
    for k, v in _V4_DEFAULTS.items():
        kw.setdefault(k, v)
    if int(d.get("num_key_value_heads", 1) or 1) != 1:
        raise ConfigError(f"deepseek_v4 attention has one shared key/value head; config.json says "
                          f"num_key_value_heads {d['num_key_value_heads']}")
    head_dim = int(kw["head_dim"])
    if "qk_rope_head_dim" not in d:
        prf = d.get("partial_rotary_factor") or 64 / 512
        kw["qk_rope_head_dim"] = int(head_dim * prf)
    n = int(kw["num_hidden_layers"])
    rates = {_CSA: 4, _HCA: 128}
    rates.update(d.get("compress_rates") or {})
    if d.get("compress_rate_csa") is not None:
        rates[_CSA] = int(d["compress_rate_csa"])
    if d.get("compress_rate_hca") is not None:
        rates[_HCA] = int(d["compress_rate_hca"])
    if rates[_CSA] == rates[_HCA]:
        raise ConfigError(f"compress_rates gives compressed sparse and heavily compressed attention the same ratio "
                          f"{rates[_CSA]}; they must differ (the ratio tells the layer kind)")
    kw["csa_compress_ratio"] = int(rates[_CSA])
    ratios = None
    if d.get("layer_types") is not None:
        bad = [t for t in d["layer_types"] if t not in (_SLIDING, _CSA, _HCA)]
        if bad:
            raise ConfigError(f"layer_types entries {bad} are unknown; use {_SLIDING}, {_CSA} or {_HCA}")
        ratios = tuple(0 if t == _SLIDING else int(rates[t]) for t in d["layer_types"])
    if d.get("compress_ratios") is not None:
        listed = tuple(int(r) for r in d["compress_ratios"])
        if ratios is not None and listed[:len(ratios)] != ratios:
            raise ConfigError(f"config.json's compress_ratios {list(listed)} disagree with its layer_types; drop one")
        ratios = listed  # may also list the MTP layers
    if ratios is None:  # transformers' default: two HCA layers, then CSA / HCA alternating
        ratios = tuple(rates[_HCA] if i < 2 or i % 2 == 0 else rates[_CSA] for i in range(n))
    kw["compress_ratios"] = ratios
    if d.get("mlp_layer_types") is not None:
        types = list(d["mlp_layer_types"])
        n_hash = sum(1 for t in types if t == "hash_moe")
        if types[:n_hash] != ["hash_moe"] * n_hash or any(t not in ("hash_moe", "moe") for t in types):
            raise ConfigError(f"mlp_layer_types {types} must be hash_moe for the first layers and moe after them "
                              f"(any other order is not supported)")
        kw["num_hash_layers"] = n_hash
    elif d.get("num_hash_layers") is None:
        kw["num_hash_layers"] = min(3, n)  # transformers' default
    kw["qk_nope_head_dim"] = head_dim - int(kw["qk_rope_head_dim"])
    kw["v_head_dim"] = head_dim
    kw["kv_lora_rank"] = head_dim
    kw["intermediate_size"] = int(kw["moe_intermediate_size"])  # transformers' alias (V4 has no dense MLP)
    if d.get("initializer_range") is not None:
        kw.setdefault("init_method_std", float(d["initializer_range"]))


def _v4_to_hf(c: "ModelConfig") -> Dict[str, Any]:
    """transformers' DeepseekV4Config keys (plus compress_ratios, which it accepts and which also lists the MTP
    layers)."""
    L = c.num_hidden_layers
    types = [c.attention_type(i) for i in range(L)]
    hca = sorted({c.compress_ratio(i) for i in range(L) if types[i] == _HCA})
    if len(hca) > 1:
        raise ConfigError(f"heavily compressed layers use several ratios {hca}; transformers' DeepseekV4Config has one")
    d: Dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "moe_intermediate_size": c.moe_intermediate_size, "num_hidden_layers": L,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": 1, "head_dim": c.head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim, "partial_rotary_factor": c.qk_rope_head_dim / c.head_dim,
        "q_lora_rank": c.q_lora_rank, "num_experts_per_tok": c.num_experts_per_tok,
        "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
        "scoring_func": c.scoring_func, "topk_method": c.topk_method, "norm_topk_prob": c.norm_topk_prob,
        "routed_scaling_factor": c.routed_scaling_factor, "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "compress_rope_theta": c.compress_rope_theta, "layer_types": types,
        "compress_rates": {_CSA: c.csa_compress_ratio, _HCA: hca[0] if hca else 128},
        "compress_ratios": list(c.compress_ratios) or [0] * L,
        "mlp_layer_types": ["hash_moe" if i < c.num_hash_layers else "moe" for i in range(L)],
        "hc_mult": c.hc_mult, "hc_sinkhorn_iters": c.hc_sinkhorn_iters, "hc_eps": c.hc_eps,
        "swiglu_limit": c.swiglu_limit, "sliding_window": c.sliding_window, "o_groups": c.o_groups,
        "o_lora_rank": c.o_lora_rank, "index_n_heads": c.index_n_heads, "index_head_dim": c.index_head_dim,
        "index_topk": c.index_topk, "num_nextn_predict_layers": c.num_nextn_predict_layers,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
        "initializer_range": c.init_method_std, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
    }
    if c.rope_scaling is not None:  # transformers applies it to the compressed layers only, as DeepSeek does
        rs = c.rope_scaling
        d["rope_parameters"] = {"rope_type": rs.type, "factor": rs.factor, "beta_fast": rs.beta_fast,
                                "beta_slow": rs.beta_slow,
                                "original_max_position_embeddings": rs.original_max_position_embeddings}
    return d


# ----------------------------------------------------------------------------------------------
# Parallelism
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelConfig:
    world_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None = same as TP (Megatron default)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    moe_token_dispatcher_type: str = "alltoall"
    # layer placement (placement.py): Megatron-Core's layout string, MindSpeed's per-stage layer counts and
    # noop (identity, padding-only) layer slots in --num-layers numbering
    pipeline_model_parallel_layout: Optional[str] = None
    num_layer_list: Tuple[int, ...] = ()
    noop_layers: Tuple[int, ...] = ()
    # interleaved schedule: micro-batches run per virtual stage in groups of this many (None = pp; Megatron's
    # --microbatch-group-size-per-virtual-pipeline-stage)
    microbatch_group_size_per_vp_stage: Optional[int] = None

    def __post_init__(self):
        if self.expert_tensor_parallel_size is None:
            object.__setattr__(self, "expert_tensor_parallel_size", self.tensor_model_parallel_size)
        object.__setattr__(self, "num_layer_list", tuple(self.num_layer_list))
        object.__setattr__(self, "noop_layers", tuple(self.noop_layers))
        self.validate()

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    def validate(self) -> None:
        for name in ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} is {v}; it must be an integer >= 1")
        mp = self.tp * self.pp * self.cp
        _require(self.world_size % mp == 0,
                 f"world size {self.world_size} is not a multiple of tensor-model-parallel-size {self.tp} x "
                 f"pipeline-model-parallel-size {self.pp} x context-parallel-size {self.cp} = {mp}; "
                 f"launch a multiple of {mp} processes or shrink the model-parallel sizes")
        stage = self.tp * self.cp * self.dp
        _require(stage % (self.ep * self.etp) == 0,
                 f"expert-model-parallel-size {self.ep} x expert-tensor-parallel-size {self.etp} = "
                 f"{self.ep * self.etp} does not divide the {stage} ranks of a pipeline stage "
                 f"(tp {self.tp} x cp {self.cp} x data-parallel size {self.dp}); pick an expert-model-parallel-size "
                 f"that divides {stage // self.etp}")
        _require(not (self.sequence_parallel and self.tp == 1),
                 "--sequence-parallel needs --tensor-model-parallel-size > 1 (it is 1); drop the flag or raise TP")
        _require(self.moe_token_dispatcher_type in DISPATCHER_TYPES,
                 f"--moe-token-dispatcher-type {self.moe_token_dispatcher_type!r} is unknown; "
                 f"use one of {', '.join(DISPATCHER_TYPES)}")
        if self.virtual_pipeline_model_parallel_size is not None or self.num_layers_per_virtual_pipeline_stage:
            _require(self.pp > 1, "virtual pipeline stages need --pipeline-model-parallel-size > 1 (it is 1)")
        g = self.microbatch_group_size_per_vp_stage
        _require(g is None or g >= self.pp,
                 f"--microbatch-group-size-per-virtual-pipeline-stage {g} is below pipeline-model-parallel-size "
                 f"{self.pp}; use at least {self.pp}")


# ----------------------------------------------------------------------------------------------
# Optimizer, training, data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: float = 0  # a float when given in samples (--lr-warmup-samples / global batch)
    lr_decay_iters: Optional[float] = None
    lr_warmup_init: float = 0.0  # lr at the start of warm-up (Megatron's --lr-warmup-init)
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    moe_router_bias_update_rate: float = 1e-3
    overlap_grad_reduce: bool = False
    bucket_size: Optional[int] = None
    gradient_accumulation_fusion: bool = True  # weight-grad GEMMs write into main_grad (tensor_parallel/wgrad.py)

    def __post_init__(self):
        _require(self.optimizer in ("adam", "sgd"), f"--optimizer {self.optimizer!r} is unknown; use adam or sgd")
        _require(self.lr_decay_style in LR_DECAY_STYLES,
                 f"--lr-decay-style {self.lr_decay_style!r} is unknown; use one of {', '.join(LR_DECAY_STYLES)}")
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are both set; pick one")
        _require(self.lr >= 0 and self.min_lr >= 0, f"--lr {self.lr} and --min-lr {self.min_lr} must be >= 0")
        _require(self.min_lr <= self.lr, f"--min-lr {self.min_lr} is above --lr {self.lr}; lower --min-lr")
        _require(self.lr_warmup_iters >= 0, f"--lr-warmup-iters {self.lr_warmup_iters} must be >= 0")
        _require(0.0 <= self.lr_warmup_init <= self.lr,
                 f"--lr-warmup-init {self.lr_warmup_init} must be between 0 and --lr {self.lr}")
        _require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
                 f"--adam-beta1 {self.adam_beta1} / --adam-beta2 {self.adam_beta2} must be in [0, 1)")
        _require(self.clip_grad >= 0, f"--clip-grad {self.clip_grad} must be >= 0 (0 turns clipping off)")
        _require(self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0 (0 turns it off)")
        _require(self.adam_eps > 0, f"--adam-eps {self.adam_eps} must be > 0 (e.g. 1e-8)")
        _require(self.initial_loss_scale > 0 and self.min_loss_scale > 0,
                 f"--initial-loss-scale {self.initial_loss_scale} and --min-loss-scale {self.min_loss_scale} "
                 f"must be > 0")
        _require(self.loss_scale_window >= 1, f"--loss-scale-window {self.loss_scale_window} must be >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    seq_length: int = 4096
    train_iters: int = 0
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 100
    save_interval: Optional[int] = None
    save: Optional[str] = None
    load: Optional[str] = None
    save_retain: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    seed: int = 1234
    tensorboard_dir: Optional[str] = None
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = ()
    peak_tflops: Optional[float] = None
    train_samples: Optional[int] = None  # --train-samples: train_iters = train_samples // global batch
    save_optim: bool = True  # False: --no-save-optim
    save_rng: bool = True  # False: --no-save-rng
    async_save: bool = False
    # reliability: checkpoint checks on load
    ckpt_verify: str = "checksum"
    ckpt_fallback: bool = True
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    # reliability: NaN / Inf and loss spikes (training/health.py)
    check_for_nan_in_loss_and_grad: bool = True
    nan_policy: str = "stop"
    nan_max_consecutive: int = 1
    nan_trace_modules: bool = False
    loss_spike_factor: Optional[float] = None
    loss_spike_window: int = 50
    # reliability: hangs (training/watchdog.py; the process-group timeout is platform.RuntimeOptions')
    watchdog_timeout_minutes: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "recompute_modules", tuple(self.recompute_modules))
        _require(self.ckpt_verify in ("checksum", "size"),
                 f"--ckpt-verify {self.ckpt_verify!r} is unknown; use checksum or size")
        _require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are both set; pick one")
        _require(self.nan_policy in ("stop", "skip"), f"--nan-policy {self.nan_policy!r} is unknown; use stop or skip")
        _require(self.nan_max_consecutive >= 1,
                 f"--nan-max-consecutive {self.nan_max_consecutive} must be >= 1 (1 stops at the first NaN step)")
        _require(self.loss_spike_factor is None or self.loss_spike_factor > 1.0,
                 f"--loss-spike-factor {self.loss_spike_factor} must be > 1 (e.g. 3: a loss 3x the recent mean)")
        _require(self.loss_spike_window >= 1, f"--loss-spike-window {self.loss_spike_window} must be >= 1")
        _require(self.watchdog_timeout_minutes is None or self.watchdog_timeout_minutes > 0,
                 f"--watchdog-timeout-minutes {self.watchdog_timeout_minutes} must be > 0 (leave it out to disable)")
        _require(self.micro_batch_size >= 1, f"--micro-batch-size {self.micro_batch_size} must be >= 1")
        _require(self.seq_length >= 1, f"--seq-length {self.seq_length} must be >= 1")
        _require(self.global_batch_size is None or self.global_batch_size >= 1,
                 f"--global-batch-size {self.global_batch_size} must be >= 1 (a multiple of micro-batch-size x "
                 f"data-parallel size)")
        _require(self.log_interval >= 1, f"--log-interval {self.log_interval} must be >= 1 (log every N iterations)")
        _require(self.save_interval is None or self.save_interval >= 1,
                 f"--save-interval {self.save_interval} must be >= 1 (leave it out to save at the end only)")
        _require(self.eval_iters >= 0, f"--eval-iters {self.eval_iters} must be >= 0 (0 turns evaluation off)")
        _require(self.eval_interval >= 1 or self.eval_iters == 0,
                 f"--eval-interval {self.eval_interval} must be >= 1 (or pass --eval-iters 0 to turn evaluation off)")
        _require(self.exit_interval is None or self.exit_interval >= 1,
                 f"--exit-interval {self.exit_interval} must be >= 1")
        object.__setattr__(self, "recompute_modules", check_recompute(
            self.recompute_granularity, self.recompute_method, self.recompute_num_layers, self.recompute_modules))


def check_recompute(granularity: Optional[str], method: Optional[str], num_layers: Optional[int],
                    modules: Sequence[str]) -> Tuple[str, ...]:
    """The recompute rules (one ConfigError each); returns the modules, ``("core_attn",)`` for selective
    without any. Used by TrainingConfig and by recompute.apply_recompute's keyword form."""
    modules = tuple(modules)
    _require(granularity in RECOMPUTE_GRANULARITIES,
             f"--recompute-granularity {granularity!r} is unknown; use full or selective")
    _require(method in RECOMPUTE_METHODS, f"--recompute-method {method!r} is unknown; use uniform or block")
    if granularity == "full":
        _require(method is not None, "--recompute-granularity full needs --recompute-method uniform or block")
        _require(num_layers is not None and num_layers >= 1,
                 f"--recompute-granularity full needs --recompute-num-layers >= 1 (got {num_layers})")
    bad = [m for m in modules if m not in RECOMPUTE_MODULES]
    _require(not bad, f"--recompute-modules {' '.join(bad)} unknown; use any of {' '.join(RECOMPUTE_MODULES)}")
    if granularity == "selective" and not modules:
        modules = ("core_attn",)
    return modules


@dataclass(frozen=True)
class DataConfig:
    data_path: Tuple[str, ...] = ()
    split: str = "969,30,1"
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    make_vocab_size_divisible_by: int = 128
    mock_data: bool = False
    num_workers: int = 0
    sft: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False  # no loss where the input token is eod
    data_cache_path: Optional[str] = None  # dataset index caches (default: next to the data)

    def __post_init__(self):
        object.__setattr__(self, "data_path", tuple(self.data_path))
        try:
            parts = [float(x) for x in self.split.replace("/", ",").split(",")]
        except ValueError:
            raise ConfigError(f"--split {self.split!r} is not a list of numbers; use e.g. 969,30,1")
        _require(len(parts) <= 3 and all(p >= 0 for p in parts) and sum(parts) > 0,
                 f"--split {self.split!r} needs up to three non-negative weights with a positive sum, e.g. 969,30,1")
        _require(self.make_vocab_size_divisible_by >= 1,
                 f"--make-vocab-size-divisible-by {self.make_vocab_size_divisible_by} must be >= 1")
        _require(self.num_workers >= 0, f"--num-workers {self.num_workers} must be >= 0 (0 loads in the main process)")


# ----------------------------------------------------------------------------------------------
# Rules across configs
# ----------------------------------------------------------------------------------------------
def pipeline_layer_split(num_layers: int, pp: int, vp: int = 1, first: Optional[int] = None,
                         last: Optional[int] = None) -> List[List[int]]:
    """Number of decoder layers held by each (virtual chunk, pp rank): result[v][p].

    Uneven split: ``first`` / ``last`` layers on the first / last pipeline stage, the rest spread evenly
    (Megatron's --decoder-first/last-pipeline-num-layers). Raises ConfigError when it does not divide.
    """
    fixed = {}
    if first is not None:
        fixed[0] = first
    if last is not None:
        fixed[pp - 1] = last
    rest_layers = num_layers - sum(fixed.values())
    rest_stages = pp - len(fixed)
    if fixed:
        _require(rest_layers >= 0,
                 f"decoder-first/last-pipeline-num-layers ({first}, {last}) exceed num-layers {num_layers}")
        if rest_stages == 0:
            _require(rest_layers == 0, f"decoder-first/last-pipeline-num-layers ({first}, {last}) must sum to "
                                       f"num-layers {num_layers} when pipeline-model-parallel-size is {pp}")
        else:
            _require(rest_layers % (rest_stages * vp) == 0,
                     f"after decoder-first/last-pipeline-num-layers ({first}, {last}), the remaining {rest_layers} "
                     f"layers do not split evenly over {rest_stages} middle stages x {vp} virtual stages; "
                     f"adjust the first/last counts")
        for p, n in fixed.items():
            _require(n % vp == 0, f"{n} layers on stage {p} do not split over {vp} virtual stages")
        per = rest_layers // (rest_stages * vp) if rest_stages else 0
        return [[(fixed[p] // vp if p in fixed else per) for p in range(pp)] for _ in range(vp)]
    _require(num_layers % (pp * vp) == 0,
             f"num-layers {num_layers} does not split over pipeline-model-parallel-size {pp} x virtual stages {vp} "
             f"= {pp * vp} chunks; pick sizes whose product divides {num_layers}, or use "
             f"--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
    return [[num_layers // (pp * vp)] * pp for _ in range(vp)]


def virtual_stages(model: ModelConfig, par: ParallelConfig) -> int:
    """Virtual pipeline stages per rank (from the layout string, --virtual-pipeline-model-parallel-size or
    --num-layers-per-virtual-pipeline-stage; 1 without)."""
    from .placement import placement_of
    return placement_of(model, par).vp


def microbatch_group_problem(num_micro: int, pp: int, group: Optional[int]) -> Optional[str]:
    """Why the interleaved schedule cannot run ``num_micro`` micro-batches in groups of ``group`` (default pp), or
    None. Megatron's rules: a group holds between pp and num_micro micro-batches, the last one (num_micro % N) 0
    or at least pp. The schedule (pipeline_parallel.schedules) and validate_all both use this one rule."""
    n = group or pp
    if pp <= n <= num_micro and (num_micro % n == 0 or num_micro % n >= pp):
        return None
    fix = (f"raise the global batch to at least {pp} micro-batches per data-parallel rank" if num_micro < pp else
           f"use --microbatch-group-size-per-virtual-pipeline-stage {num_micro} (or a multiple of {pp} "
           f"micro-batches per data-parallel rank)")
    return (f"the interleaved schedule runs {num_micro} micro-batches in groups of {n}; a group must hold between "
            f"pipeline-model-parallel-size {pp} and {num_micro} micro-batches and the last one 0 or at least {pp}; "
            f"{fix}")


def check_microbatch_groups(num_micro: int, par: ParallelConfig, vp: int) -> None:
    """ConfigError when interleaving (vp > 1) cannot run these micro-batches (microbatch_group_problem)."""
    if vp > 1 and par.pp > 1:
        problem = microbatch_group_problem(num_micro, par.pp, par.microbatch_group_size_per_vp_stage)
        _require(problem is None, problem or "")


def validate_all(model: ModelConfig, par: ParallelConfig, train: Optional[TrainingConfig] = None,
                 opt: Optional[OptimizerConfig] = None, data: Optional[DataConfig] = None) -> None:
    """Rules that need more than one config. Raises ConfigError on the first broken rule."""
    tp, ep = par.tp, par.ep
    _require(model.num_attention_heads % tp == 0,
             f"num-attention-heads {model.num_attention_heads} is not divisible by tensor-model-parallel-size {tp}; "
             f"pick a TP size that divides {model.num_attention_heads}")
    if model.is_moe:
        _require(model.n_routed_experts % ep == 0,
                 f"expert-model-parallel-size {ep} does not divide num-experts {model.n_routed_experts}; "
                 f"pick a divisor of {model.n_routed_experts}")
        if par.etp > 1:
            _require(model.moe_intermediate_size % par.etp == 0,
                     f"moe-ffn-hidden-size {model.moe_intermediate_size} is not divisible by "
                     f"expert-tensor-parallel-size {par.etp}")
        if model.n_shared_experts:
            _require((model.n_shared_experts * model.moe_intermediate_size) % tp == 0,
                     f"shared-expert width {model.n_shared_experts * model.moe_intermediate_size} is not divisible "
                     f"by tensor-model-parallel-size {tp}")
    else:
        _require(ep == 1, f"expert-model-parallel-size {ep} needs a MoE model (num-experts is 0); set it to 1")
    _require(model.intermediate_size % tp == 0 or model.first_k_dense_replace == 0 and model.is_moe,
             f"ffn-hidden-size {model.intermediate_size} is not divisible by tensor-model-parallel-size {tp}")
    if model.model_type == "deepseek_v4":  # mirrors models/deepseek_v4/attention.check_config
        _require(model.o_groups % tp == 0,
                 f"o_groups {model.o_groups} is not divisible by tensor-model-parallel-size {tp}: each rank holds "
                 f"whole output groups; pick a TP size that divides {model.o_groups}")
    if model.has_indexer:
        _require(model.index_n_heads % tp == 0,
                 f"index_n_heads {model.index_n_heads} is not divisible by tensor-model-parallel-size {tp}")
    vp = virtual_stages(model, par)  # places every layer (placement.py): one ConfigError per placement rule
    if train is not None:
        _require(par.cp == 1,
                 f"--context-parallel-size {par.cp}: context parallelism is not built yet (nothing would split the "
                 f"sequence, and the loss would be normalised over the wrong ranks); use --context-parallel-size 1 "
                 f"and give those ranks to data or tensor parallelism")
        gbs = train.global_batch_size
        if gbs is not None:
            unit = train.micro_batch_size * par.dp
            _require(gbs % unit == 0,
                     f"global-batch-size {gbs} is not divisible by micro-batch-size {train.micro_batch_size} x "
                     f"data-parallel-size {par.dp} = {unit}; use a multiple of {unit}")
        if par.sequence_parallel:
            _require(train.seq_length % tp == 0,
                     f"--sequence-parallel splits seq-length {train.seq_length} over tensor-model-parallel-size "
                     f"{tp}; use a seq-length divisible by {tp}")
        _require(train.seq_length <= model.max_position_embeddings or model.rope_scaling is not None,
                 f"seq-length {train.seq_length} exceeds max-position-embeddings {model.max_position_embeddings}; "
                 f"lower --seq-length or raise --max-position-embeddings")
        check_microbatch_groups(num_microbatches(train, par), par, vp)


def num_microbatches(train: TrainingConfig, par: ParallelConfig) -> int:
    gbs = train.global_batch_size or train.micro_batch_size * par.dp
    return gbs // (train.micro_batch_size * par.dp)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad the vocab to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
