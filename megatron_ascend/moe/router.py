"""The MoE router: gate logits in fp32, scoring, top-k expert selection, routing weights, hash routing.

Owns: ``score(logits, func)`` (softmax / sigmoid / sqrt-softplus), ``select_experts`` (greedy,
group-limited greedy = V2 per-group max, noaux_tc = V3 top-2 sum per group + bias for selection only),
``routing_weights`` and the ``TopKRouter`` module (``mlp.gate``: ``weight [E, h]`` fp32 replicated, the
fp32 buffer ``e_score_correction_bias [E]`` for noaux_tc, and ``tid2eid [vocab, topk]`` for V4 hash
layers), plus capacity-based token dropping. Does not own: balance losses and the bias update
(load_balancing.py), moving tokens (dispatcher.py).

Formulas (deepseek_architecture.md 2.2, 6.4), T tokens, E experts, K = top-k:
  logits = x.float() @ W.T                           s = softmax | sigmoid | sqrt(softplus)(logits)
  greedy:               idx = topk(s, K)
  group_limited_greedy: g = max of s per group; keep topk_group groups; idx = topk(s masked, K)
  noaux_tc:             sc = s + bias; g = sum of top-2 sc per group; keep topk_group groups;
                        idx = topk(sc masked, K)      (bias changes the choice, never the weights)
  hash:                 idx = tid2eid[input_ids]     (frozen table; weights still from the gate)
  weights w = s.gather(idx);
    greedy / group_limited_greedy (V2 remote code): norm_topk_prob and K > 1 ? w / (sum w + 1e-20)
                                                                               : w * routed_scaling_factor
    noaux_tc / hash (V3, V4): norm_topk_prob ? w / (sum w + 1e-20) : w;  then w * routed_scaling_factor
All router math runs in fp32 (float64 when the module was converted to float64, for tests).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from ..platform import kernels


def score(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "softmax":
        return logits.softmax(dim=-1)
    if func == "sigmoid":
        return logits.sigmoid()
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    raise ConfigError(f"unknown router scoring function {func!r}; use softmax, sigmoid or sqrtsoftplus")


def _group_mask(group_scores: torch.Tensor, topk_group: int, n_experts: int) -> torch.Tensor:
    """[T, n_group] group scores -> [T, E] bool mask of the experts in the kept groups."""
    t, n_group = group_scores.shape
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    return keep.unsqueeze(-1).expand(t, n_group, n_experts // n_group).reshape(t, n_experts)


def select_experts(scores: torch.Tensor, topk: int, method: str, n_group: int = 1, topk_group: int = 1,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices [T, K] of the chosen experts (no grad: selection is discrete)."""
    with torch.no_grad():
        t, e = scores.shape
        choice = scores if bias is None else scores + bias.to(scores.dtype)
        if method == "greedy" or n_group <= 1:
            return choice.topk(topk, dim=-1).indices
        grouped = choice.view(t, n_group, e // n_group)
        if method == "group_limited_greedy":
            group_scores = grouped.max(dim=-1).values
        elif method == "noaux_tc":
            group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
        else:
            raise ConfigError(f"unknown router type (topk_method) {method!r}; "
                              f"use greedy, group_limited_greedy or noaux_tc")
        mask = _group_mask(group_scores, topk_group, e)
        return choice.masked_fill(~mask, float("-inf")).topk(topk, dim=-1).indices


@kernels.reference("router_topk")
def router_topk(logits: torch.Tensor, scores: torch.Tensor, topk: int, method: str, n_group: int, topk_group: int,
                bias: Optional[torch.Tensor], scoring: str) -> torch.Tensor:
    """The kernel table's ``router_topk`` reference: ``select_experts`` on the scores (``logits`` and
    ``scoring`` are for fused kernels that score the logits themselves, e.g. torch_npu's npu_moe_gating_top_k)."""
    return select_experts(scores, topk, method, n_group, topk_group, bias)


def routing_weights(scores: torch.Tensor, idx: torch.Tensor, method: str, norm_topk_prob: bool,
                    scaling: float) -> torch.Tensor:
    w = scores.gather(1, idx)
    if method in ("greedy", "group_limited_greedy"):
        if norm_topk_prob and idx.shape[1] > 1:
            return w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * scaling
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling


def count_per_expert(e: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.bincount(e, minlength=n)`` for ids 0 <= e < n (int64 [n]) without bincount's host read: on CUDA
    (and NPU) bincount first reads max(e) from the device to size its output, a sync per call."""
    e = e.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=e.device).scatter_add_(0, e, torch.ones_like(e))


def capacity_keep_mask(idx: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity_factor: float
                       ) -> torch.Tensor:
    """[T, K] bool: keep at most ceil(T*K/E*cf) assignments per expert, the highest-weight ones (Megatron's
    'probs' drop policy, decided on this rank's tokens)."""
    t, k = idx.shape
    capacity = int(math.ceil(t * k / n_experts * capacity_factor))
    e = idx.reshape(-1)
    w = weights.detach().reshape(-1)
    by_prob = torch.argsort(w, descending=True, stable=True)
    order = by_prob[torch.argsort(e[by_prob], stable=True)]  # grouped by expert, highest weight first
    counts = count_per_expert(e, n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(e)
    rank_in_expert[order] = torch.arange(e.numel(), device=e.device) - starts[e[order]]
    return (rank_in_expert < capacity).view(t, k)


class TopKRouter(nn.Module):
    """``mlp.gate``. forward(x [T, h], input_ids [T] for hash layers) -> (weights [T, K], idx [T, K],
    scores [T, E], logits [T, E]); weights/scores/logits in the router dtype (fp32 or wider)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, hash_layer: bool = False):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.method = cfg.topk_method
        self.scoring = cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.hash_layer = hash_layer
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size, dtype=torch.float32))
        if hash_layer:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long))
            self.e_score_correction_bias = None
        elif self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # tokens per expert since the last bias update (counted only when grad is enabled) and since the
        # last collect_load_stats; never saved
        self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("stat_tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("stat_dropped", torch.zeros((), dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the gate and its buffers in fp32 when the model goes to bf16 / fp16 (HF's keep-in-fp32 rule)
        super()._apply(fn, recurse)
        for name in ("weight",):
            p = getattr(self, name)
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        for name in ("e_score_correction_bias", "local_tokens_per_expert", "stat_tokens_per_expert",
                     "stat_dropped"):
            b = getattr(self, name, None)
            if b is not None and b.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, b.float())
        return self

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        scores = score(logits, self.scoring)
        if self.hash_layer:
            if input_ids is None:
                raise ValueError(f"layer {self.layer_idx} is a hash-routed MoE layer (num_hash_layers); "
                                 f"pass input_ids to MoELayer.forward")
            idx = self.tid2eid[input_ids.reshape(-1).long()].long()
            method = "noaux_tc"  # V4 weight rule
        else:
            idx = kernels.get("router_topk")(logits, scores, self.topk, self.method, self.n_group, self.topk_group,
                                             self.e_score_correction_bias, self.scoring)
            method = self.method
        weights = routing_weights(scores, idx, method, self.norm_topk_prob, self.scaling)
        return weights, idx, scores, logits

    @torch.no_grad()
    def record(self, idx: torch.Tensor, dropped: Optional[torch.Tensor], count_for_bias: bool) -> None:
        """Add this forward's routing counts: to the bias-update buffer when ``count_for_bias`` (the caller
        passes torch.is_grad_enabled() of the forward, so eval does not count), and to the monitoring stats.
        ``dropped``: the number of dropped assignments as a device tensor (None when dropless); nothing here
        reads the device."""
        counts = count_per_expert(idx, self.num_experts).to(self.stat_tokens_per_expert)
        if count_for_bias:
            self.local_tokens_per_expert += counts
        self.stat_tokens_per_expert += counts
        if dropped is not None:
            self.stat_dropped += dropped
