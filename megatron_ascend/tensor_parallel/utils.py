"""Helpers that read ``param.shard`` (sharding.ShardSpec): slice a full tensor to this rank's shard,
gather a shard back to the full tensor, and the TP all-reduce of sequence-parallel parameter grads.

Used by the HF loader, parity tests and (optionally) the DDP wrapper / checkpoint code.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .sharding import shard_spec


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full`` (the global tensor) for ``param``, checked against its ShardSpec."""
    spec = shard_spec(param)
    want = spec.global_shape(tuple(param.shape))
    if tuple(full.shape) != want:
        raise ValueError(f"full tensor shape {tuple(full.shape)} does not match the global shape {want} of a "
                         f"parameter with local shape {tuple(param.shape)}")
    return full[spec.slices(tuple(param.shape))]


@torch.no_grad()
def gather_full(t: torch.Tensor, param: torch.Tensor, groups) -> torch.Tensor:
    """All-gather ``t`` (a tensor shaped and sharded like ``param``, e.g. its data or grad) to the full tensor."""
    spec = shard_spec(param)
    out = t.detach().contiguous()
    for dim, (name, _, size) in sorted(spec.axes.items()):
        parts = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(parts, out, group=groups.group(name))
        out = torch.cat(parts, dim=dim)
    return out


def allreduce_sequence_parallel_grads(params: Iterable[torch.Tensor], groups, grad_attr: str = "grad") -> None:
    """Sum over TP the grads (``p.<grad_attr>``: ``grad``, or the DDP wrapper's ``main_grad``) of params marked
    ``sequence_parallel`` (norm weights and row-parallel biases under SP see only their rank's tokens), as one
    flat all-reduce. The DDP wrapper does this in training; tests call it directly."""
    if groups is None or groups.tp_size == 1:
        return
    grads = [getattr(p, grad_attr) for p in params
             if getattr(p, "sequence_parallel", False) and getattr(p, grad_attr, None) is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=groups.tp)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()
