"""Autograd-aware collectives the MoE layer needs, with variable sizes per rank.

Owns: all-to-all with variable split sizes (``all_to_all``), all-gather / reduce-scatter of a variable
number of rows per rank along dim 0 (``all_gather_v`` / ``reduce_scatter_v``), and the four small
tensor-parallel mappings the shared experts use (copy / reduce / sequence gather / sequence scatter), which
are thin names over ``tensor_parallel.mappings`` (one implementation of each collective in the library).

Every function is a no-op when ``group`` is None or has one rank. Every rank of the group must call the
same functions in the same order, also when it has no rows to send (a zero-row tensor is fine):
nothing here skips a collective because the local tensor is empty, which is what keeps uneven routing
from hanging.

Split sizes are python int lists (``all_to_all_single`` takes them so on NCCL, HCCL and gloo), so dispatch
costs one device-to-host copy of the counts per layer (dispatcher.py gathers every host int it needs into it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ..tensor_parallel.mappings import (_all_reduce, copy_to_tensor_model_parallel_region,
                                        gather_from_sequence_parallel_region,
                                        reduce_from_tensor_model_parallel_region,
                                        reduce_scatter_to_sequence_parallel_region)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _a2a(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((int(sum(out_splits)),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(map(int, out_splits)), list(map(int, in_splits)), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Rows ``in_splits[j]`` of x go to rank j; ``out_splits[j]`` rows arrive from rank j (dim 0)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all of an int64 count vector [n * c] (chunk j goes to rank j); no autograd."""
    if group_size(group) == 1:
        return counts.clone()
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


def gather_sizes(n: int, group, device=None) -> List[int]:
    """Every rank's row count, as python ints (one small all-gather)."""
    if group_size(group) == 1:
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(group_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.cat(out).tolist()  # one device-to-host read


def _gather_v(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    # each rank sends its rows to every rank: all-to-all of x repeated n times (variable sizes for free)
    n = len(sizes)
    rep = x.unsqueeze(0).expand((n,) + tuple(x.shape)).reshape((n * x.shape[0],) + tuple(x.shape[1:]))
    return _a2a(rep, sizes, [x.shape[0]] * n, group)


def _scatter_sum_v(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    n, me = len(sizes), dist.get_rank(group)
    got = _a2a(x, [sizes[me]] * n, sizes, group)
    return got.view((n, sizes[me]) + tuple(x.shape[1:])).sum(0)


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sum_v(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _scatter_sum_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_v(grad.contiguous(), ctx.sizes, ctx.group), None, None


def all_gather_v(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank j has ``sizes[j]``) along dim 0; backward = reduce-scatter.

    Works for any dtype (int index tensors too: they simply carry no grad)."""
    if group_size(group) == 1:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _gather_v(x, sizes, group)
    return _AllGatherV.apply(x, list(sizes), group)


def reduce_scatter_v(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Sum x [sum(sizes), ...] over ranks and keep this rank's rows; backward = all-gather."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterV.apply(x, list(sizes), group)


# ---- tensor-parallel mappings for the shared experts: the tensor_parallel package's own ---------------
def copy_to_tp(x, group):
    """identity forward, all-reduce backward (input of a column-parallel layer without SP)."""
    return copy_to_tensor_model_parallel_region(x, group)


def reduce_from_tp(x, group):
    """all-reduce forward, identity backward (output of a row-parallel layer without SP)."""
    return reduce_from_tensor_model_parallel_region(x, group)


def gather_from_sp(x, group):
    """all-gather dim 0 forward, reduce-scatter backward ([s/tp, b, h] -> [s, b, h])."""
    return gather_from_sequence_parallel_region(x, group)


def reduce_scatter_to_sp(x, group):
    """reduce-scatter dim 0 forward, all-gather backward ([s, b, h] partial -> [s/tp, b, h])."""
    return reduce_scatter_to_sequence_parallel_region(x, group)


def all_reduce_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum a statistics tensor over the group (no autograd)."""
    return x if group_size(group) == 1 else _all_reduce(x.detach(), group)


def maybe_group(groups, name: str) -> Optional[object]:
    """``groups.group(name)`` or None when there is no ProcessGroups (single process)."""
    if groups is None:
        return None
    return groups.group(name)
