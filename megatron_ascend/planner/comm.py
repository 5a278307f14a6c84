"""Analytic communication volume of one training step on one rank, and its time on a cluster.

Volumes are *payloads* in bytes per (group, op), counted the way megatron_ascend.comm_counter counts a call:
all_reduce / broadcast / send / recv = the tensor's bytes; all_gather = the gathered output; reduce_scatter =
the input; all_to_all = the input this rank sends (its own chunk included). bench/comm_volume.py and
tests/test_comm_volume.py check these formulas against counted collectives of real steps.

Per micro-batch of T = micro_batch_size x seq_length tokens (beta = activation bytes):
  TP, no SP:   per layer 2 forward all-reduces [T, h] (attention out, FFN out) and 2 backward all-reduces
               [T, h] (grad of the replicated inputs); embedding forward all-reduce, head backward all-reduce.
  TP + SP:     per layer 2 all-gathers + 2 reduce-scatters forward and the same backward, [T, h] each;
               embedding reduce-scatter forward / all-gather backward, head all-gather / reduce-scatter.
  CE over TP:  per head (main + MTP) a max all-reduce [T] and a sum all-reduce [2T] (fp32).
  EP:          per MoE layer dispatch + combine all-to-all forward and the same backward, each sending
               T_local x top-k x h x beta (dropless: exact for dispatch; combine equals it summed over the group).
  PP:          each boundary sends [T/tp if SP else T, h] forward and its gradient backward, per micro-batch
               and per virtual chunk.
Per step: DP grads all-reduce (or reduce-scatter + param all-gather with the distributed optimizer) over dp
(dense) and expert-dp (experts); the embedding group all-reduces the embedding grad between the first and the
last stage when both hold a copy (MTP or tied embeddings with PP > 1).

Time: ring factors 2(n-1)/n (all-reduce), (n-1)/n (all-gather / reduce-scatter / all-to-all) over the
bandwidth of the group's placement (inside one node: intra-node; otherwise the inter-node NIC, with the
all-to-all split into its intra- and inter-node peers).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..config import ModelConfig
from .layout import Cluster, Layout, group_size, group_stride, nodes_spanned
from .memory import Precision
from .params import ParamCount, StageSplit, padded_vocab

Key = Tuple[str, str]  # (group, op)


@dataclass(frozen=True)
class CommOptions:
    seq_length: int
    num_microbatches: int
    act_bytes: int = 2
    grad_bytes: int = 4
    param_bytes: int = 2
    tp_bwd_width: Optional[int] = None  # width of the backward TP all-reduce per sublayer (default h)


def _add(v: Dict[Key, float], group: str, op: str, nbytes: float, size: int) -> None:
    if size > 1 and nbytes:
        v[(group, op)] += nbytes


def rank_step_volume(cfg: ModelConfig, layout: Layout, split: StageSplit, p: int, count: ParamCount,
                     o: CommOptions) -> Dict[Key, float]:
    """Payload bytes per (group, op) that one rank of pipeline stage ``p`` moves in one optimizer step."""
    v: Dict[Key, float] = defaultdict(float)
    t, e, d, edp = layout.tp, layout.ep, layout.dp, layout.edp
    T = layout.micro_batch_size * o.seq_length
    h, a = cfg.hidden_size, o.act_bytes
    m = o.num_microbatches
    layers = split.rank_layers(p)
    first, last = p == 0, p == layout.pp - 1
    mtp = cfg.num_nextn_predict_layers if last else 0
    n_layers = len(layers) + mtp  # an MTP block is one more decoder layer
    moe_layers = sum(1 for i in layers if cfg.model_type == "deepseek_v4" or cfg.is_moe_layer(i))
    if mtp and (cfg.model_type == "deepseek_v4" or cfg.is_moe_layer(cfg.num_hidden_layers - 1)):
        moe_layers += mtp
    act = T * h * a
    bw = (o.tp_bwd_width or h) * T * a
    heads = (1 + mtp) if last else 0
    # --- tensor parallel
    if layout.sp:
        _add(v, "tp", "all_gather", m * n_layers * 2 * (act + act), t)  # fwd 2 AG + bwd 2 AG (of RS)
        _add(v, "tp", "reduce_scatter", m * n_layers * 2 * (act + act), t)
        if first:
            _add(v, "tp", "reduce_scatter", m * act, t)
            _add(v, "tp", "all_gather", m * act, t)
        _add(v, "tp", "all_gather", m * heads * act, t)
        _add(v, "tp", "reduce_scatter", m * heads * act, t)
    else:
        _add(v, "tp", "all_reduce", m * n_layers * 2 * (act + bw / 1.0), t)
        if first:
            _add(v, "tp", "all_reduce", m * act, t)
        _add(v, "tp", "all_reduce", m * heads * act, t)
    _add(v, "tp", "all_reduce", m * heads * (T * 4 + 2 * T * 4), t)  # vocab-parallel CE: max, (sum-exp, target)
    # --- expert parallel (dropless, top-k copies of each local token)
    t_local = T / t
    if cfg.is_moe:
        _add(v, "ep", "all_to_all", m * moe_layers * 4 * t_local * cfg.num_experts_per_tok * h * a, e)
    # --- pipeline parallel
    chunks = layout.vp
    if layout.pp > 1:
        boundary = (T / t if layout.sp else T) * h * a
        sends_fwd = m * chunks - (m if last else 0)  # the very last virtual stage sends nothing forward
        sends_bwd = m * chunks - (m if first else 0)
        v[("pp", "send")] += (sends_fwd + sends_bwd) * boundary
        v[("pp", "recv")] += (sends_fwd + sends_bwd) * boundary  # every stage receives what a neighbour sends
    # --- data parallel (per step)
    if layout.distributed_optimizer:
        _add(v, "dp", "reduce_scatter", count.dense * o.grad_bytes, d)
        _add(v, "dp", "all_gather", count.dense * o.param_bytes, d)
        _add(v, "edp", "reduce_scatter", count.expert * o.grad_bytes, edp)
        _add(v, "edp", "all_gather", count.expert * o.param_bytes, edp)
    else:
        _add(v, "dp", "all_reduce", count.dense * o.grad_bytes, d)
        _add(v, "edp", "all_reduce", count.expert * o.grad_bytes, edp)
    if layout.pp > 1 and (first or last) and (cfg.num_nextn_predict_layers or cfg.tie_word_embeddings):
        V = padded_vocab(cfg, t) // t
        v[("embedding", "all_reduce")] += V * h * o.grad_bytes
    return dict(v)


# ------------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------------
WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
        "send": lambda n: 1.0, "recv": lambda n: 0.0, "broadcast": lambda n: 1.0}


def collective_seconds(group: str, op: str, nbytes: float, layout: Layout, cluster: Cluster) -> float:
    """Seconds the payload takes on the wire for this group's placement (bandwidth only, no latency)."""
    n = group_size(layout, group) if group != "pp" else 2
    if n <= 1 or nbytes <= 0:
        return 0.0
    wire = WIRE[op](n) * nbytes
    intra, inter = cluster.intra_node_gbps * 1e9, cluster.inter_node_gbps * 1e9
    if group == "pp":
        inside = group_stride(layout, "pp") < cluster.devices_per_node
        return wire / (intra if inside else inter)
    nodes = nodes_spanned(layout, group, cluster.devices_per_node)
    if nodes == 1:
        return wire / intra
    if op == "all_to_all":
        per_node = max(1, n // nodes)
        frac_intra = (per_node - 1) / (n - 1)
        return max(wire * frac_intra / intra, wire * (1 - frac_intra) / inter)
    return wire / inter


def volume_seconds(vol: Dict[Key, float], layout: Layout, cluster: Cluster) -> Dict[str, float]:
    out: Dict[str, float] = defaultdict(float)
    for (group, op), nbytes in vol.items():
        out[group] += collective_seconds(group, op, nbytes, layout, cluster)
    return dict(out)


def ep_seconds(cfg: ModelConfig, layout: Layout, cluster: Cluster, tokens_local: float, moe_layers: int,
               num_microbatches: int, act_bytes: float, dispatch_bytes: Optional[float] = None,
               node_limit: Optional[int] = None) -> float:
    """Expert all-to-all time of one step on one rank (dispatch + combine, forward + backward).

    Plain (what moe/'s all-to-all dispatcher does): each of the k copies of a token goes to a uniformly
    random expert; (nodes-1)/nodes of them cross the node boundary. ``node_limit`` M models DeepSeek-V3's
    node-limited routing with DeepEP-style dedup: one copy per selected node over the NIC (at most M nodes),
    fanned out over NVLink inside it. ``dispatch_bytes`` = 1 models FP8 dispatch (combine stays bf16)."""
    e = layout.ep
    if e <= 1 or moe_layers == 0:
        return 0.0
    k, h = cfg.num_experts_per_tok, cfg.hidden_size
    nodes = nodes_spanned(layout, "ep", cluster.devices_per_node)
    per_node = max(1, e // nodes)
    intra_bw, inter_bw = cluster.intra_node_gbps * 1e9, cluster.inter_node_gbps * 1e9
    total = 0.0
    for bytes_el in ((dispatch_bytes or act_bytes), act_bytes, act_bytes, act_bytes):
        if nodes == 1:
            t = tokens_local * k * (e - 1) / e * h * bytes_el / intra_bw
        else:
            remote = (nodes - 1) / nodes
            inter_copies = (min(node_limit, nodes) * remote) if node_limit else k * remote
            intra_copies = k * (per_node - 1) / e if not node_limit else k * (1 - 1 / per_node)
            t = max(tokens_local * inter_copies * h * bytes_el / inter_bw,
                    tokens_local * intra_copies * h * bytes_el / intra_bw)
        total += t
    return total * moe_layers * num_microbatches
