"""Token dispatchers: move each (token, expert) assignment to the rank that holds the expert, run the grouped
experts, bring the outputs back and sum them weighted by the routing probabilities.

Owns ``AllToAllDispatcher`` (the default) and ``AllGatherDispatcher``; both are dropless unless the router
marked assignments as dropped (index -1), both are differentiable end to end (the collectives are autograd
functions in comm.py), and both call every collective on every rank whatever the routing, so zero-token
experts, ranks that send or receive nothing and ranks with no tokens at all do not hang.

``dispatch_combine(x [n, h], idx [n, K], weights [n, K], experts, dropless=None) -> [n, h]``:

all-to-all (group ep; with expert-TP, the etp group first gathers its ranks' tokens so that each etp rank
computes its I-slice of the same tokens, and reduce-scatters the partial outputs at the end):
  1. assignments sorted by global expert id (stable) -> rows grouped by destination ep rank, then expert
  2. counts per expert exchanged (all-to-all of E int64) -> python split lists (the layer's one host read)
  3. all-to-all of the rows with variable splits; the received [src rank][local expert] chunks are reordered
     to [local expert][src rank] so each local expert's rows are contiguous
  4. grouped SwiGLU experts
  5. inverse reorder, all-to-all back, ``weight * y`` summed per token: dropless, the sort is a permutation of
     the n*k rows -- ``platform.kernels.get("moe_permute")`` (the reference gathers both ways and sums over k in
     one batched GEMM; torch_npu's npu_moe_token_permute / unpermute on Ascend); with dropped assignments,
     ``index_add`` into the token rows

all-gather (group tp_ep = etp x ep): every rank gathers all tokens, indices and weights of the group, keeps the
assignments of its local experts, computes them, scatters ``weight * y`` into the gathered token rows, and a
reduce-scatter returns each rank its own rows summed over the group. Simple; more traffic for large ep.

Does not own: routing (router.py) or the expert weights (experts.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..platform import kernels
from . import comm
from .router import count_per_expert


def _sort_valid_first(idx: torch.Tensor, weights: torch.Tensor, n_experts: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the n*k assignments by expert (stable), dropped ones (index -1) last, without reading the device.
    Returns (token index [n*k], expert id [n*k] (n_experts for dropped), weight [n*k], counts [n_experts + 1]
    (the last bin counts the dropped)); the caller keeps the first ``sum(counts[:-1])`` rows once it holds the
    counts as host ints."""
    n, k = idx.shape
    e = idx.reshape(-1)
    key = torch.where(e >= 0, e, torch.full_like(e, n_experts))
    order = torch.argsort(key, stable=True)
    counts = count_per_expert(key, n_experts + 1)
    return torch.div(order, k, rounding_mode="floor"), key[order], weights.reshape(-1)[order], counts


def _chunk_transpose_index(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Rows laid out as chunks sizes[a, b] in (a, b) row-major order -> index that lays them out in (b, a).
    ``total`` = sizes.sum() as a host int (given, so that nothing here waits for the device)."""
    a, b = sizes.shape
    starts = (torch.cumsum(sizes.reshape(-1), 0) - sizes.reshape(-1)).view(a, b)
    sizes_t, starts_t = sizes.t().reshape(-1), starts.t().reshape(-1)
    base = torch.repeat_interleave(starts_t, sizes_t, output_size=total)
    new_starts = torch.cumsum(sizes_t, 0) - sizes_t
    offset = torch.arange(total, device=sizes.device) - torch.repeat_interleave(new_starts, sizes_t,
                                                                                output_size=total)
    return base + offset


def _combine(y: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """sum over assignments: out[tok] += w * y (in the wider of y's dtype and w's dtype)."""
    dtype = torch.promote_types(y.dtype, w.dtype)
    out = y.new_zeros(n, y.shape[1], dtype=dtype)
    return out.index_add(0, tok, y.to(dtype) * w.to(dtype).unsqueeze(1))


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_group=None, etp_group=None):
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep = comm.group_size(ep_group)
        self.num_local = num_experts // self.ep

    def dispatch_combine(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts,
                         dropless: Optional[bool] = None) -> torch.Tensor:
        """``dropless``: the caller guarantees no assignment is dropped (index -1), as MoELayer knows from its
        configuration; None checks (one more host read).

        Host reads per call: ONE, the split sizes -- ``all_to_all_single`` takes its splits as host ints (NCCL,
        HCCL and gloo alike; MindSpeed and Megatron read them too) and the grouped GEMM fallbacks need the
        per-expert row counts: send / receive sums per rank and the per-local-expert counts come to the host
        together, one small device-to-host copy that waits for the routing of this layer (the device runs
        ahead no further than this layer's router). With expert-TP > 1, one more for the etp group's row
        counts (comm.gather_sizes)."""
        n_own = x.shape[0]
        etp_sizes = None
        if comm.group_size(self.etp_group) > 1:
            etp_sizes = comm.gather_sizes(n_own, self.etp_group, x.device)
            x = comm.all_gather_v(x, etp_sizes, self.etp_group)
            idx = comm.all_gather_v(idx, etp_sizes, self.etp_group)
            weights = comm.all_gather_v(weights, etp_sizes, self.etp_group)
        n = x.shape[0]
        if dropless is None:
            dropless = bool((idx >= 0).all())  # a host read; MoELayer passes the answer instead
        unpermute = None
        if dropless and n > 0:  # a permutation of the n*k rows: the kernel table's moe_permute
            sent, unpermute = kernels.get("moe_permute")(x, idx)
            counts = count_per_expert(idx, self.num_experts)  # [E] = [ep, E_local] rows to send
        else:
            tok, e, w, counts = _sort_valid_first(idx, weights, self.num_experts)
            counts = counts[:self.num_experts]
        recv = comm.all_to_all_counts(counts, self.ep_group).view(self.ep, self.num_local)  # [src, E_local]
        send = counts.view(self.ep, self.num_local)
        host = torch.cat([send.sum(1), recv.sum(1), recv.sum(0)]).tolist()  # the one host read (see above)
        in_splits, out_splits = host[:self.ep], host[self.ep:2 * self.ep]
        local_counts = host[2 * self.ep:]
        if unpermute is None:
            valid = sum(in_splits)
            tok, w = tok[:valid], w[:valid]
            sent = x[tok]
        rows = comm.all_to_all(sent, out_splits, in_splits, self.ep_group)
        reorder = None
        if self.ep > 1 and self.num_local > 1:
            reorder = _chunk_transpose_index(recv, sum(out_splits))
            rows = rows[reorder]
        y = experts(rows, local_counts)
        if reorder is not None:
            y = y.new_empty(y.shape).index_copy(0, reorder, y)  # undo the reorder
        y = comm.all_to_all(y, in_splits, out_splits, self.ep_group)
        out = (unpermute(y, weights) if unpermute is not None else _combine(y, tok, w, n)).to(x.dtype)
        if etp_sizes is not None:
            out = comm.reduce_scatter_v(out, etp_sizes, self.etp_group)
        return out


class AllGatherDispatcher:
    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, tp_ep_group=None):
        self.num_experts = num_experts
        self.group = tp_ep_group
        self.num_local = num_experts // ep_size
        self.first = ep_rank * self.num_local

    def dispatch_combine(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts,
                         dropless: Optional[bool] = None) -> torch.Tensor:
        """Host reads per call: two -- every rank's row count (the variable all-gather needs host sizes) and the
        per-local-expert counts of the gathered assignments (the grouped GEMM's groups; this rank's share of
        the gathered rows is only known after the gather). ``dropless`` is accepted for the common interface:
        here every rank drops the other ranks' experts anyway."""
        sizes = comm.gather_sizes(x.shape[0], self.group, x.device)
        xg = comm.all_gather_v(x, sizes, self.group)
        ig = comm.all_gather_v(idx, sizes, self.group)
        wg = comm.all_gather_v(weights, sizes, self.group)
        local = ig - self.first
        local = torch.where((ig >= 0) & (local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        tok, _, w, counts = _sort_valid_first(local, wg, self.num_local)
        counts = counts[:self.num_local].tolist()  # host read 2 (see above)
        valid = sum(counts)
        tok, w = tok[:valid], w[:valid]
        y = experts(xg[tok], counts)
        out = _combine(y, tok, w, xg.shape[0]).to(x.dtype)
        return comm.reduce_scatter_v(out, sizes, self.group)
