"""The DeepSeekMoE block: ``shared(h) + sum_k g_k * expert_k(h)`` (the residual add is the decoder layer's).

``MoELayer(model_cfg, par_cfg, groups, layer_idx)``; ``forward(hidden [s, b, h] or [s/tp, b, h] under sequence
parallel, input_ids [b, s] for hash layers) -> same shape``. Parameters (names as HF, see ARCHITECTURE.md):
``gate.weight [E, h]`` fp32 replicated, ``gate.e_score_correction_bias [E]`` (noaux_tc) or ``gate.tid2eid``
(hash layers), ``experts.{gate,up}_proj [E/ep, I/etp, h]``, ``experts.down_proj [E/ep, h, I/etp]``,
``shared_experts.{gate,up,down}_proj.weight`` (column / column / row parallel over tp).

Tensor parallel. Every TP rank routes a disjoint 1/tp slice of the tokens of the TP group, in the flattened
[s, b] order: under sequence parallel that is the rank's own [s/tp, b] tokens; without it, hidden is
replicated and rank r takes the r-th of ``tensor_split(s*b, tp)`` chunks (any s*b, also smaller than tp).
So routing work is not duplicated, and the routed outputs of the ranks are disjoint:
* without SP:  out = all_reduce_tp( shared_partial(hidden) + pad_to_all_tokens(routed_own_slice) )
  one all-reduce serves both the row-parallel shared expert and the gather of the routed slices; the input
  goes through copy_to_tp (all-reduce of its grad), so the backward is the exact full gradient;
* with SP:     out = reduce_scatter_seq( shared_partial(all_gather_seq(hidden)) ) + routed_own_tokens.
Consequences: the router weight gets a partial gradient on each TP rank (marked ``sequence_parallel`` so the
DP wrapper all-reduces it over tp, like a norm weight under SP); the balance-loss statistics of a sequence
are summed over tp (load_balancing.py); the expert-bias counts of all tp ranks add up to the TP group's batch.

Selective recompute (``megatron_ascend.recompute.apply_recompute`` sets ``recompute_modules``; the names this
layer takes are ``supports_recompute``): ``moe_act`` drops the SwiGLU activation of the routed and shared experts
(recomputed from gate/up in backward, experts.swiglu_then); ``shared_experts`` checkpoints the shared-expert MLP
(only its input is kept). Both recompute local compute only: the router, the dispatcher's collectives and the
TP/SP reductions are outside the recomputed regions, so no side effect (bias counts, logged aux values) repeats.
With both, the shared expert is checkpointed whole and its activation is not handled separately.

Dropless by default; ``moe_expert_capacity_factor`` drops the lowest-weight assignments over capacity per
expert, decided on each rank's own tokens (so, as in Megatron, which tokens drop depends on the layout).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import LOAD_BALANCING_TYPES, ConfigError, ModelConfig, ParallelConfig
from . import comm
from .dispatcher import AllGatherDispatcher, AllToAllDispatcher
from .experts import GroupedExperts, SharedExperts
from .load_balancing import attach_aux_loss, balance_loss, in_backward_recompute, z_loss
from .router import TopKRouter, capacity_keep_mask
from ..tensor_parallel.random import checkpoint as tp_checkpoint
from ..tensor_parallel.sharding import init_normal_, mark_sharded


def _check(cfg: ModelConfig, par: Optional[ParallelConfig], layer_idx: int) -> None:
    if not cfg.is_moe:
        raise ConfigError(f"MoELayer for layer {layer_idx} needs n_routed_experts > 0 (it is {cfg.n_routed_experts})")
    if cfg.moe_router_load_balancing_type not in LOAD_BALANCING_TYPES:
        raise ConfigError(f"moe_router_load_balancing_type {cfg.moe_router_load_balancing_type!r} is unknown; "
                          f"use one of {', '.join(LOAD_BALANCING_TYPES)}")
    if cfg.moe_expert_capacity_factor is not None and cfg.moe_expert_capacity_factor <= 0:
        raise ConfigError(f"moe_expert_capacity_factor {cfg.moe_expert_capacity_factor} must be > 0, or None "
                          f"for dropless routing")
    if cfg.moe_z_loss_coeff < 0 or cfg.aux_loss_alpha < 0:
        raise ConfigError(f"aux_loss_alpha {cfg.aux_loss_alpha} and moe_z_loss_coeff {cfg.moe_z_loss_coeff} "
                          f"must be >= 0")
    if par is not None and cfg.n_routed_experts % par.ep:
        raise ConfigError(f"expert-model-parallel-size {par.ep} does not divide num-experts {cfg.n_routed_experts}; "
                          f"pick a divisor of {cfg.n_routed_experts}")


class MoELayer(nn.Module):
    supports_recompute = ("moe_act", "shared_experts")

    def __init__(self, model_cfg: ModelConfig, par_cfg: Optional[ParallelConfig], groups, layer_idx: int,
                 seed: int = 1234, init: bool = True):
        super().__init__()
        cfg = model_cfg
        _check(cfg, par_cfg, layer_idx)
        self.cfg, self.layer_idx = cfg, layer_idx
        self.groups = groups
        self.sequence_parallel = bool(par_cfg.sequence_parallel) if par_cfg is not None else False
        self.tp_group = comm.maybe_group(groups, "tp")
        self.tp_size, self.tp_rank = comm.group_size(self.tp_group), comm.group_rank(self.tp_group)
        ep_group = comm.maybe_group(groups, "ep")
        etp_group = comm.maybe_group(groups, "etp")
        ep_size, ep_rank = comm.group_size(ep_group), comm.group_rank(ep_group)
        etp_size, etp_rank = comm.group_size(etp_group), comm.group_rank(etp_group)
        self.hash_layer = layer_idx < cfg.num_hash_layers
        self.gate = TopKRouter(cfg, layer_idx, hash_layer=self.hash_layer)
        # replicated, but each TP rank routes its own tokens: partial grads, all-reduced over tp like SP norms
        mark_sharded(self.gate.weight, {}, sequence_parallel=self.tp_size > 1)
        self.experts = GroupedExperts(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
                                      ep_rank, ep_size, etp_rank, etp_size, layer_idx, cfg.swiglu_limit)
        width = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = (SharedExperts(cfg.hidden_size, width, self.tp_rank, self.tp_size, layer_idx,
                                             cfg.swiglu_limit) if width > 0 else None)
        kind = par_cfg.moe_token_dispatcher_type if par_cfg is not None else "alltoall"
        if kind == "allgather":
            self.dispatcher = AllGatherDispatcher(cfg.n_routed_experts, ep_rank, ep_size,
                                                  comm.maybe_group(groups, "tp_ep"))
        else:
            self.dispatcher = AllToAllDispatcher(cfg.n_routed_experts, ep_group, etp_group)
        lb = cfg.moe_router_load_balancing_type
        self.balance = None if (lb == "none" or cfg.aux_loss_alpha == 0 or self.hash_layer) else lb
        # gradient scale of this layer's aux losses; None = the global set_aux_loss_scale value
        self.aux_loss_scale: Optional[float] = None
        self.recompute_modules = frozenset()
        if init:
            self.init_weights(cfg.init_method_std, seed)

    @property
    def recompute_modules(self) -> frozenset:
        return self._recompute_modules

    @recompute_modules.setter
    def recompute_modules(self, modules) -> None:
        modules = frozenset(modules)
        bad = modules - frozenset(self.supports_recompute)
        if bad:
            raise ConfigError(f"MoELayer recompute modules {' '.join(sorted(bad))} are unknown; use any of "
                              f"{' '.join(self.supports_recompute)}")
        self._recompute_modules = modules
        self.experts.recompute_act = "moe_act" in modules
        if self.shared_experts is not None:  # a checkpointed shared expert keeps nothing inside anyway
            self.shared_experts.recompute_act = "moe_act" in modules and "shared_experts" not in modules

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """Partial shared-expert output; checkpointed (local compute only) under 'shared_experts' recompute."""
        if "shared_experts" in self._recompute_modules and torch.is_grad_enabled():
            return tp_checkpoint(self.shared_experts, x)
        return self.shared_experts(x)

    def init_weights(self, std: float, seed: int) -> None:
        init_normal_(self.gate.weight, f"model.layers.{self.layer_idx}.mlp.gate.weight", std, seed)
        self.experts.init_weights(std, seed)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, seed)

    # -- tokens this TP rank routes: a contiguous chunk of the flattened [s, b] tokens --------------------
    def _token_chunk(self, n_tokens: int):
        sizes = [len(c) for c in torch.arange(n_tokens).tensor_split(self.tp_size)]
        return sum(sizes[:self.tp_rank]), sizes[self.tp_rank]

    def forward(self, hidden: torch.Tensor, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        s_loc, b, h = hidden.shape
        tp, sp = self.tp_size, self.sequence_parallel and self.tp_size > 1
        if sp:
            x_full = comm.gather_from_sp(hidden, self.tp_group) if self.shared_experts is not None else None
            x_loc = hidden.reshape(-1, h)
            s_full = s_loc * tp
            start, n = self.tp_rank * s_loc * b, s_loc * b
        else:
            x_full = comm.copy_to_tp(hidden, self.tp_group)
            s_full = s_loc
            start, n = self._token_chunk(s_loc * b)
            x_loc = x_full.reshape(-1, h)[start:start + n]
        ids = None
        if self.hash_layer:
            if input_ids is None:
                raise ValueError(f"layer {self.layer_idx} is a hash-routed MoE layer; pass input_ids [b, s]")
            if input_ids.shape != (b, s_full):
                raise ValueError(f"input_ids shape {tuple(input_ids.shape)} does not match hidden {tuple(hidden.shape)}"
                                 f" (expected [b, s] = [{b}, {s_full}]); pass the full-sequence input_ids")
            ids = input_ids.t().reshape(-1)[start:start + n]
        routed = self._routed(x_loc, ids, start, b, s_full)
        if sp:
            out = routed.view(s_loc, b, h)
            if self.shared_experts is not None:
                out = comm.reduce_scatter_to_sp(self._shared(x_full), self.tp_group) + out
            return out
        if tp == 1:
            out = routed.view(s_loc, b, h)
            return out + self._shared(x_full) if self.shared_experts is not None else out
        total = s_loc * b
        padded = torch.nn.functional.pad(routed, (0, 0, start, total - start - n)).view(s_loc, b, h)
        if self.shared_experts is not None:
            padded = self._shared(x_full) + padded
        return comm.reduce_from_tp(padded, self.tp_group)

    def _routed(self, x: torch.Tensor, ids: Optional[torch.Tensor], start: int, b: int, s_full: int) -> torch.Tensor:
        cfg = self.cfg
        weights, idx, scores, logits = self.gate(x, ids)
        grad_on = torch.is_grad_enabled()
        aux_terms = {}  # training forwards only (Megatron's rule): eval neither adds nor logs them
        if self.balance is not None and grad_on:
            seg = (torch.arange(start, start + x.shape[0], device=x.device) % b) if self.balance == "seq_aux_loss" \
                else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            n_segs, seg_len = (b, s_full) if self.balance == "seq_aux_loss" else (1, s_full * b)
            aux_terms[self.balance] = balance_loss(scores, idx, seg, n_segs, seg_len, cfg.aux_loss_alpha,
                                                   self.tp_group)
        if cfg.moe_z_loss_coeff > 0 and grad_on:
            aux_terms["z_loss"] = z_loss(logits, cfg.moe_z_loss_coeff, s_full * b)
        dropped = None  # a device count: no host read per layer
        route_idx = idx
        dropless = cfg.moe_expert_capacity_factor is None
        if not dropless:
            keep = capacity_keep_mask(idx, weights, cfg.n_routed_experts, cfg.moe_expert_capacity_factor)
            dropped = (~keep).sum()
            route_idx = torch.where(keep, idx, torch.full_like(idx, -1))
        recompute = in_backward_recompute()
        if not recompute:
            self.gate.record(idx, dropped, grad_on)
        out = self.dispatcher.dispatch_combine(x, route_idx, weights, self.experts, dropless=dropless)
        if aux_terms:
            if not recompute:
                vals = getattr(self.gate, "aux_values", {})
                for k, v in aux_terms.items():  # device tensors: read once per step by collect_load_stats
                    v = v.detach()
                    vals[k] = vals[k] + v if k in vals else v
                self.gate.aux_values = vals
                self.gate.aux_calls = getattr(self.gate, "aux_calls", 0) + 1
            out = attach_aux_loss(out, sum(aux_terms.values()), self.aux_loss_scale)
        return out
