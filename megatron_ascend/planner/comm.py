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
               and per virtual chunk (dualpipev: the turn of the V, stage pp-1 -> pp, stays on one rank).
Per step: DP grads all-reduce (or reduce-scatter + param all-gather with the distributed optimizer) over dp
(dense) and expert-dp (experts); the embedding group all-reduces the embedding grad between the first and the
last stage when both hold a copy (MTP or tied embeddings with PP > 1; not under dualpipev, where rank 0 holds
both ends).

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
from .params import ParamCount, StageSplit, padded_vocab

Key = Tuple[str, str]  # (group, op)


@dataclass(frozen=True)
class CommOptions:
    seq_length: int
    num_microbatches: int
    act_bytes: int = 2
    grad_bytes: int = 4
    param_bytes: int = 2
    p2p_header_bytes: int = 80  # pipeline_parallel.p2p sends an int64[10] shape header before each tensor
    dp_padding_elems: int = 0  # distributed-optimizer bucket padding (dense), from the live buffers when known
    edp_padding_elems: int = 0


def _add(v: Dict[Key, float], group: str, op: str, nbytes: float, size: int) -> None:
    if size > 1 and nbytes:
        v[(group, op)] += nbytes


def _latent_width(cfg: ModelConfig) -> int:
    return (cfg.q_lora_rank or cfg.hidden_size) + cfg.kv_lora_rank + cfg.qk_rope_head_dim


def _sp_param_count(count: ParamCount, sp: bool) -> int:
    """Replicated params whose grads are partial per TP rank (DDP all-reduces them over tp): under SP every
    replicated weight that runs on local tokens (norms, q_a / kv_a projections, router, MTP eh_proj); without
    SP only the router (each TP rank routes its own token chunk)."""
    p = count.parts
    if not sp:
        return p.get("router", 0) + p.get("mtp_router", 0)
    keys = ("norms", "attn_replicated", "router", "final_norm", "mtp_proj", "indexer")
    return sum(p.get(k, 0) + p.get("mtp_" + k, 0) for k in keys)


def rank_step_volume(cfg: ModelConfig, layout: Layout, split: StageSplit, p: int, count: ParamCount,
                     o: CommOptions) -> Dict[Key, float]:
    """Payload bytes per (group, op) that one rank of pipeline stage ``p`` moves in one optimizer step, for the
    library's own implementation (models/deepseek, moe all-to-all dispatcher with expert-TP 1, distributed/,
    pipeline_parallel/p2p). Group names are ProcessGroups names. The token count and the logged losses are
    counted (they share the loss group with the dense gradients); other scalars (grad norm, expert load counts)
    are not modelled, they are a few bytes."""
    v: Dict[Key, float] = defaultdict(float)
    t, e, edp = layout.tp, layout.ep, layout.edp
    T = layout.micro_batch_size * o.seq_length
    h, a = cfg.hidden_size, o.act_bytes
    m = o.num_microbatches
    layers = split.rank_layers(p)
    first, last = split.is_first(p), split.is_last(p)
    D = cfg.num_nextn_predict_layers if last else 0
    v4 = cfg.model_type == "deepseek_v4"
    moe_flags = [v4 or cfg.is_moe_layer(i) for i in layers]
    if D:
        moe_flags += [v4 or cfg.is_moe_layer(cfg.num_hidden_layers - 1)] * D
    n_att, n_moe = len(moe_flags), sum(moe_flags)
    n_dense = n_att - n_moe
    act = T * h * a
    lat = T * _latent_width(cfg) * a
    heads = (1 + D) if last else 0
    embeds = (1 if first else 0) + D  # each MTP depth embeds its shifted ids
    shared = cfg.n_shared_experts > 0
    if layout.sp:
        moe_sp = n_moe * (2 * act if shared else 0)  # shared expert: gather in, reduce-scatter out
        ag = n_att * (lat + act) + n_dense * 2 * act + moe_sp + embeds * act + heads * act
        _add(v, "tp", "all_gather", m * ag, t)
        _add(v, "tp", "reduce_scatter", m * ag, t)  # every all-gather has a reduce-scatter partner (fwd/bwd)
    else:
        ar = n_att * (lat + act) + n_dense * 2 * act + n_moe * 2 * act + embeds * act + heads * act
        _add(v, "tp", "all_reduce", m * ar, t)
    _add(v, "tp", "all_reduce", m * heads * (T * 4 + 2 * T * 4), t)  # vocab-parallel CE: max; (target, sum-exp)
    _add(v, "tp", "all_reduce", _sp_param_count(count, layout.sp) * o.grad_bytes, t)  # DDP: SP / router grads
    # expert parallel: per MoE layer and micro-batch the E expert counts, then dispatch + combine rows forward
    # and backward; each rank routes T/tp tokens x top-k copies (dropless; exact summed over the ep group)
    if cfg.is_moe and e > 1:
        rows = T / t * cfg.num_experts_per_tok
        _add(v, "ep", "all_to_all", m * n_moe * (4 * rows * h * a + cfg.n_routed_experts * 8), e)
    # pipeline: one header + payload per transfer; forward to the next stage, grads back
    if layout.pp > 1:
        boundary = (T / t if layout.sp else T) * h * a + o.p2p_header_bytes
        fwd, bwd = split.p2p_transfers(p, m)
        v[("pp", "send")] += (fwd + bwd) * boundary
        v[("pp", "recv")] += (fwd + bwd) * boundary
    # data parallel: grads over dp x cp (dense) and expert-dp (experts), params back with the distributed optimizer
    d = layout.dp
    dense = count.dense + o.dp_padding_elems
    expert = count.expert + o.edp_padding_elems
    if layout.distributed_optimizer:
        _add(v, "dp_cp", "reduce_scatter", dense * o.grad_bytes, d)
        _add(v, "dp_cp", "all_gather", dense * o.param_bytes, d)
        _add(v, "edp", "reduce_scatter", expert * o.grad_bytes, edp)
        _add(v, "edp", "all_gather", expert * o.param_bytes, edp)
    else:
        _add(v, "dp_cp", "all_reduce", dense * o.grad_bytes, d)
        _add(v, "edp", "all_reduce", expert * o.grad_bytes, edp)
    # the loss group (dp x cp, parallel_state.LOSS_GROUP) also carries the trainer's global token count (one
    # int64, every rank) and, on the loss stage, the logged loss sums (fp32: lm; per MTP depth its sum and count)
    _add(v, "dp_cp", "all_reduce", 8 + (4 * (1 + 2 * D) if last else 0), d)
    if layout.pp > 1 and (first != last) and (cfg.num_nextn_predict_layers or cfg.tie_word_embeddings):
        V = padded_vocab(cfg, t) // t
        # the grad sum, plus embedding_sync's int64 [2 x 2] agreement check before it
        v[("embedding", "all_reduce")] += V * h * o.grad_bytes + 2 * 2 * 8
    return dict(v)


# ------------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------------
WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
        "send": lambda n: 1.0, "recv": lambda n: 0.0, "broadcast": lambda n: 1.0}


def collective_seconds(group: str, op: str, nbytes: float, layout: Layout, cluster: Cluster) -> float:
    """Seconds the payload takes on the wire for this group's placement (bandwidth only, no latency)."""
    group = {"dp_cp": "dp"}.get(group, group)
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
