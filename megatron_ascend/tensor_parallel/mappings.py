"""Autograd-aware collectives for the tensor-parallel region (Megatron's mappings).

Owns: the eight region mappings below, each a torch.autograd.Function whose backward is the
adjoint of its forward. Activations are ``[s, b, h]``: "sequence" mappings work on dim 0,
"tensor" mappings on the last dim. Every mapping is the identity when ``group`` is None or has
one rank, so single-process models run the same code.

| function | forward | backward |
|---|---|---|
| copy_to_tensor_model_parallel_region | identity | all-reduce |
| reduce_from_tensor_model_parallel_region | all-reduce | identity |
| scatter_to_tensor_model_parallel_region | split last dim | all-gather last dim |
| gather_from_tensor_model_parallel_region | all-gather last dim | split last dim |
| scatter_to_sequence_parallel_region | split dim 0 | all-gather dim 0 |
| gather_from_sequence_parallel_region | all-gather dim 0 | reduce-scatter dim 0 (split if tensor_parallel_output_grad=False) |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter dim 0 | all-gather dim 0 |
| all_to_all | all_to_all_single | all_to_all_single with the splits swapped |

Does not own: process-group construction (parallel_state).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# -- raw collectives (no autograd) -----------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} tensor-parallel ranks; "
                         f"make it a multiple of {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    if dim == 0:
        out = x.new_empty((x.shape[0] * n,) + tuple(x.shape[1:]))
        _ALL_GATHER(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[0] % n != 0:
        raise ValueError(f"cannot reduce-scatter sequence length {x.shape[0]} over {n} tensor-parallel ranks; "
                         f"use a sequence length divisible by {n}")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    _REDUCE_SCATTER(out, x, group=group)
    return out


# torch >= 2.12 names them *_single (the *_tensor names warn as deprecated). Looked up at call time, so
# wrappers installed on torch.distributed (comm_counter, profilers) see every call.
def reduce_scatter_tensor(out, x, group=None, async_op=False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, group=group, async_op=async_op)


def all_gather_tensor(out, x, group=None, async_op=False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


_REDUCE_SCATTER = reduce_scatter_tensor
_ALL_GATHER = all_gather_tensor


# -- autograd functions ------------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, -1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split_dim(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, 0, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tp_grad = tensor_parallel_output_grad
        return _gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.tp_grad:
            return _reduce_scatter_dim0(g, ctx.group), None, None
        return _split_dim(g, 0, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, 0, ctx.group), None


def _a2a(x: torch.Tensor, group, out_splits: Optional[List[int]], in_splits: Optional[List[int]]) -> torch.Tensor:
    x = x.contiguous()
    if out_splits is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        if group_size(group) == 1:
            return x
        return _a2a(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, g):
        if group_size(ctx.group) == 1:
            return g, None, None, None
        return _a2a(g, ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


# -- public API ----------------------------------------------------------------------------------------
def copy_to_tensor_model_parallel_region(x, group):
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x, group):
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x, group):
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x, group):
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x, group):
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad: bool = True):
    """All-gather dim 0. Backward reduce-scatters (the consumer is tensor-parallel, so each rank holds a
    partial gradient) or, with ``tensor_parallel_output_grad=False``, just keeps this rank's slice (the
    gradient is already complete and replicated)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, group):
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def all_to_all(group, x, output_split_sizes=None, input_split_sizes=None):
    """all_to_all_single along dim 0 with optional uneven splits; backward swaps the splits."""
    return _AllToAll.apply(x, group, output_split_sizes, input_split_sizes)
