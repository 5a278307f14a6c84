"""Enumerate layouts for a model on a cluster, evaluate memory and step time, rank the feasible ones.

``evaluate(...)`` costs one Layout: per pipeline stage the exact model-state bytes (params.py + memory.py),
the activations of one micro-batch times the micro-batches in flight, a fixed reserve, and the step time
(step_time.py). ``search(...)`` walks TP x PP x VP x EP x ETP x distributed optimizer x recompute x
micro-batch size (uneven first/last stages where the layers do not divide), drops what breaks a config rule,
and sorts the feasible plans by predicted tokens/s per device.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from ..config import ConfigError, ModelConfig, validate_all
from .layout import Cluster, Layout
from . import memory_v4
from .memory import (GIB, ActivationOptions, ModelStateBytes, Precision, embedding_activation_bytes,
                     head_activation_bytes, inflight_microbatches, layer_activation_bytes, model_state_bytes,
                     selective_modules)
from .params import ParamCount, StageSplit, padded_vocab, rank_params, stage_split
from .step_time import StepTime, TimeOptions, head_flops, layer_flops, mtp_layer_flops, step_time


@dataclass(frozen=True)
class MemoryOptions:
    reserve_gib: float = 4.0  # runtime context, communication buffers, allocator slack
    usable_fraction: float = 0.95  # of HBM the allocator can hand out before fragmentation bites
    flash_attention: bool = True


@dataclass
class StageMemory:
    stage: int
    states: ModelStateBytes
    activations: float
    inflight: float
    reserve: float
    params: int

    @property
    def total(self) -> float:
        return self.states.total + self.activations + self.reserve


@dataclass
class Plan:
    layout: Layout
    memory: List[StageMemory]
    time: StepTime
    feasible: bool
    num_microbatches: int
    note: str = ""

    @property
    def peak(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.total)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layer_splits(cfg: ModelConfig, pp: int, vp: int, seq: int) -> List[Tuple[Optional[int], Optional[int]]]:
    """Candidate (first, last) stage layer counts: even when it divides, else the best uneven ones."""
    L = cfg.num_hidden_layers
    if pp == 1:
        return [(None, None)]
    if L % (pp * vp) == 0:
        return [(None, None)]
    out = []
    for first in range(0, L + 1, vp):
        for last in range(0, L - first + 1, vp):
            rest = L - first - last
            if pp == 2:
                if rest == 0:
                    out.append((first, last))
            elif rest > 0 and rest % ((pp - 2) * vp) == 0:
                out.append((first, last))
    if not out:
        return []
    # keep the split whose slowest stage (layers + head/MTP on the last) is cheapest
    def cost(fl):
        try:
            split = stage_split(cfg, pp, vp, *fl)
        except ConfigError:
            return float("inf")
        lf = [sum(layer_flops(cfg, seq, i) for i in split.rank_layers(p)) for p in range(pp)]
        D = cfg.num_nextn_predict_layers
        lf[-1] += mtp_layer_flops(cfg, seq) + (D + 1) * head_flops(cfg)
        return max(lf)
    out.sort(key=cost)
    return out[:1]


def evaluate(cfg: ModelConfig, layout: Layout, cluster: Cluster, seq_length: int, global_batch_size: int,
             prec: Precision = Precision(), topts: TimeOptions = TimeOptions(),
             mopts: MemoryOptions = MemoryOptions()) -> Plan:
    """Memory per stage and step time of one layout (raises ConfigError when the layout is invalid)."""
    if layout.world != cluster.num_devices:
        raise ConfigError(f"layout {layout.short()} uses {layout.world} devices but the cluster has "
                          f"{cluster.num_devices}; make tp x pp x dp equal --num-devices")
    _validate(cfg, layout)
    unit = layout.micro_batch_size * layout.dp
    if global_batch_size % unit:
        raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro-batch x dp = {unit}")
    m = global_batch_size // unit
    split = stage_split(cfg, layout.pp, layout.vp, layout.first_stage_layers, layout.last_stage_layers,
                        layout.layer_counts, layout.schedule)
    counts = [_rank_params(cfg, split, p, layout.tp, layout.ep, layout.etp) for p in range(layout.pp)]
    ao = ActivationOptions(seq_length=seq_length, micro_batch_size=layout.micro_batch_size, tp=layout.tp,
                           sp=layout.sp, ep=layout.ep, etp=layout.etp, recompute=layout.recompute,
                           flash_attention=mopts.flash_attention, act_bytes=prec.activation,
                           selective_modules=selective_modules(cfg))
    full = ActivationOptions(**{**ao.__dict__, "recompute": "none"})
    vocab_local = padded_vocab(cfg, layout.tp) // layout.tp
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers

    def chunk_act(p: int, v: int, o: ActivationOptions) -> Tuple[float, List[float]]:
        head = (p, v) == split.head_chunk
        per_layer = [_layer_act(cfg, i, o) for i in split.layers[p][v]]
        per_layer += [_layer_act(cfg, L, o, True)] * D if head else []
        act = sum(per_layer)
        if cfg.model_type == "deepseek_v4":  # the RoPE tables selective mla_up_proj keeps per chunk
            act += memory_v4.rope_checkpoint_bytes(cfg, o, list(split.layers[p][v]) + ([L] if head and D else []))
        if head:
            act += head_activation_bytes(cfg, o, vocab_local, D)
        if (p, v) == (0, 0):
            act += embedding_activation_bytes(o, cfg)
        return act, per_layer

    def stage_act(p: int, o: ActivationOptions) -> Tuple[float, List[float]]:
        parts = [chunk_act(p, v, o) for v in range(len(split.layers[p]))]
        return sum(a for a, _ in parts), [x for _, pl in parts for x in pl]

    dual = layout.schedule == "dualpipe"
    if dual:  # rank p holds stage p and its mirror
        counts = [_add_counts(counts[p], counts[layout.pp - 1 - p]) for p in range(layout.pp)]
    mem = []
    for p in range(layout.pp):
        act, _ = stage_act(p, ao)
        if dual:  # forward direction holds pp - p micro-batches of stage p, the reverse one p + 1 of its mirror
            inflight = float(layout.pp + 1)
            total_act = act * (layout.pp - p) + stage_act(layout.pp - 1 - p, ao)[0] * (p + 1)
        elif layout.schedule == "dualpipev":  # the V's stage p holds 2pp - p micro-batches, stage 2pp-1-p p + 1
            S = 2 * layout.pp
            inflight = (S + 1) / 2.0  # in units of the rank's two chunks
            total_act = chunk_act(p, 0, ao)[0] * (S - p) + chunk_act(p, 1, ao)[0] * (p + 1)
        else:
            inflight = inflight_microbatches(layout.pp, layout.vp, p, m)
            total_act = act * inflight
        if layout.recompute == "full":  # the layer being recomputed holds its full activations once
            work = stage_act(p, full)[1] + (stage_act(layout.pp - 1 - p, full)[1] if dual else [])
            total_act += max(work) if work else 0.0
        states = model_state_bytes(counts[p], prec, layout.dp, layout.edp, layout.distributed_optimizer)
        mem.append(StageMemory(p, states, total_act, inflight, mopts.reserve_gib * GIB, counts[p].total))
    t = step_time(cfg, layout, split, counts, cluster, seq_length, global_batch_size, topts,
                  act_bytes=prec.activation, grad_bytes=prec.grad, param_bytes=prec.param)
    peak = max(x.total for x in mem)
    feasible = peak <= cluster.hbm_gib * GIB * mopts.usable_fraction
    return Plan(layout, mem, t, feasible, m)


@functools.lru_cache(maxsize=None)
def _layer_act_cached(cfg, i, ao, mtp):
    return layer_activation_bytes(cfg, i, ao, mtp)


def _layer_act(cfg, i, ao, mtp=False):
    return _layer_act_cached(cfg, i, ao, mtp)


@functools.lru_cache(maxsize=4096)
def _rank_params_cached(cfg, split, p, tp, ep, etp):
    return rank_params(cfg, split, p, tp, ep, etp)


def _validate(cfg: ModelConfig, layout: Layout) -> None:
    """config.validate_all's rules for this layout. A split ParallelConfig cannot express (layer_counts,
    dualpipev) is checked by stage_split instead, so the rest is validated with the pipeline folded into dp."""
    if not layout.custom_split:
        validate_all(cfg, layout.to_parallel_config())
        return
    flat = layout.replace(pp=1, vp=1, dp=layout.dp * layout.pp, schedule="1f1b", layer_counts=None)
    validate_all(cfg, flat.to_parallel_config())
    if (layout.tp * layout.dp) % (layout.ep * layout.etp):
        raise ConfigError(f"expert-model-parallel-size {layout.ep} x expert-tensor-parallel-size {layout.etp} "
                          f"does not divide tp x dp = {layout.tp * layout.dp}")


def _add_counts(a: ParamCount, b: ParamCount) -> ParamCount:
    c = ParamCount()
    c += a
    c += b
    return c


def _rank_params(cfg, split: StageSplit, p, tp, ep, etp) -> ParamCount:
    return _rank_params_cached(cfg, split, p, tp, ep, etp)


def candidate_layouts(cfg: ModelConfig, cluster: Cluster, seq_length: int, global_batch_size: int,
                      tp_sizes: Optional[Sequence[int]] = None, pp_sizes: Optional[Sequence[int]] = None,
                      vp_sizes: Sequence[int] = (1, 2), ep_sizes: Optional[Sequence[int]] = None,
                      recompute: Sequence[str] = ("none", "selective", "full"),
                      micro_batch_sizes: Sequence[int] = (1, 2),
                      distributed_optimizer: Sequence[bool] = (False, True)) -> Iterable[Layout]:
    N = cluster.num_devices
    tps = tp_sizes or [t for t in _divisors(cluster.devices_per_node) if cfg.num_attention_heads % t == 0]
    for tp in tps:
        pps = pp_sizes or [p for p in _divisors(N // tp) if p <= cfg.num_hidden_layers]
        for pp in pps:
            if (N // tp) % pp:
                continue
            dp = N // (tp * pp)
            for vp in vp_sizes:
                if vp > 1 and (pp == 1 or cfg.num_hidden_layers < pp * vp):
                    continue
                for first, last in layer_splits(cfg, pp, vp, seq_length):
                    for etp in sorted({1, tp}):
                        eps = ep_sizes or ([e for e in _divisors(cfg.n_routed_experts) if (tp * dp) % (e * etp) == 0]
                                           if cfg.is_moe else [1])
                        for ep in eps:
                            if (tp * dp) % (ep * etp):
                                continue
                            for mbs in micro_batch_sizes:
                                if global_batch_size % (mbs * dp):
                                    continue
                                for dopt, rc in itertools.product(distributed_optimizer, recompute):
                                    yield Layout(tp=tp, pp=pp, vp=vp, ep=ep, etp=etp, dp=dp, sp=tp > 1,
                                                 distributed_optimizer=dopt, recompute=rc, micro_batch_size=mbs,
                                                 first_stage_layers=first, last_stage_layers=last)


def search(cfg: ModelConfig, cluster: Cluster, seq_length: int, global_batch_size: int,
           prec: Precision = Precision(), topts: TimeOptions = TimeOptions(),
           mopts: MemoryOptions = MemoryOptions(), keep_infeasible: bool = False,
           **space) -> Tuple[List[Plan], int, int]:
    """All feasible plans (every valid one with ``keep_infeasible``), fastest first, plus (number evaluated,
    number rejected by config rules)."""
    plans, n, bad = [], 0, 0
    for lay in candidate_layouts(cfg, cluster, seq_length, global_batch_size, **space):
        n += 1
        try:
            plan = evaluate(cfg, lay, cluster, seq_length, global_batch_size, prec, topts, mopts)
        except (ConfigError, ValueError):
            bad += 1
            continue
        if plan.feasible or keep_infeasible:
            plans.append(plan)
    plans.sort(key=lambda p: -p.time.tokens_per_s_per_device)
    return plans, n, bad
