"""Contiguous gradient buffers (and, for the distributed optimizer, parameter buffers) cut into buckets.

Owns: the layout of one buffer (which params, in which order, at which offsets), its buckets, the bucket
reductions (all-reduce, or reduce-scatter for the distributed optimizer) and the parameter all-gather
after a distributed-optimizer step. Does not own: autograd hooks and microbatch bookkeeping (ddp.py), the
optimizer's view of the shards (optimizer/).

One buffer holds params of one dtype and one kind (dense, reduced over dp x cp; or expert, reduced over
expert-dp). Params are laid out in *reverse* registration order, which is roughly the order their
gradients are produced in backward, so the first bucket is ready first:

    grad_data [numel]  = | bucket 0: p_n | p_n-1 | ... | pad | bucket 1: ... | pad |
    param.main_grad    = grad_data[start:end].view(param.shape)           (always)
    param.data         = param_data[start:end].view(param.shape)          (distributed optimizer only)

Distributed optimizer only: each param start is aligned to ``align`` elements and each bucket is padded to a
multiple of lcm(d, align), d = size of the reducing group, so bucket b splits into d equal contiguous
shards that ignore param boundaries: rank r owns bucket_start + [r * s, (r + 1) * s), s = bucket_numel / d.
Without it there is no padding at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..tensor_parallel.mappings import all_gather_tensor as _all_gather
from ..tensor_parallel.mappings import reduce_scatter_tensor as _reduce_scatter
from ..tensor_parallel.wgrad import zero_if_stale


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class ParamSlot:
    """Where one parameter lives in its buffer (element offsets into the flat buffer)."""
    name: str
    start: int
    end: int
    bucket: int


class Bucket:
    """A contiguous range of a buffer that is reduced by one collective."""

    def __init__(self, buffer: "GradBuffer", index: int, start: int, end: int, params: List[torch.nn.Parameter]):
        self.buffer, self.index, self.start, self.end = buffer, index, start, end
        self.params = params  # in layout order
        self.param_ids = {id(p) for p in params}
        self.ready: set = set()  # ids of params whose grad arrived in this sync round
        self.handle = None  # async work of the launched reduction
        self.launched = False

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def grad_data(self) -> torch.Tensor:
        return self.buffer.grad_data[self.start:self.end]

    @property
    def param_data(self) -> Optional[torch.Tensor]:
        pd = self.buffer.param_data
        return None if pd is None else pd[self.start:self.end]

    def shard_range(self, rank: Optional[int] = None) -> Tuple[int, int]:
        """Buffer offsets [a, b) owned by ``rank`` (default: this rank) under the distributed optimizer."""
        d = self.buffer.group_size
        r = self.buffer.group_rank if rank is None else rank
        s = self.numel // d
        return self.start + r * s, self.start + (r + 1) * s

    def reset(self) -> None:
        self.ready.clear()
        self.handle = None
        self.launched = False

    def start_grad_sync(self, async_op: bool) -> None:
        """Scale and reduce this bucket's grads (reduce-scatter into the owned shard, or all-reduce)."""
        if self.launched:
            return
        self.launched = True
        for p in self.params:  # lazily zeroed buffer: params that got no grad this step
            zero_if_stale(p)
        buf = self.buffer
        data = self.grad_data
        if buf.scaling_factor != 1.0:
            data.mul_(buf.scaling_factor)
        if buf.group_size == 1:
            return
        if buf.distributed:
            a, b = self.shard_range()
            out = buf.grad_data[a:b]  # in place: the owned shard is a view of the input
            self.handle = _reduce_scatter(out, data, group=buf.group, async_op=async_op)
        else:
            self.handle = dist.all_reduce(data, group=buf.group, async_op=async_op)

    def finish_grad_sync(self) -> None:
        if not self.launched:
            self.start_grad_sync(async_op=False)
        if self.handle is not None:
            self.handle.wait()
            self.handle = None

    def param_sync(self) -> None:
        """All-gather the updated param shards so every rank holds the whole bucket (distributed optimizer)."""
        buf = self.buffer
        if buf.group_size == 1:
            return
        a, b = self.shard_range()
        full = self.param_data
        _all_gather(full, buf.param_data[a:b], group=buf.group)


class GradBuffer:
    """Flat grad buffer (+ param buffer under the distributed optimizer) for params of one dtype and kind."""

    def __init__(self, named_params: Sequence[Tuple[str, torch.nn.Parameter]], *, param_dtype: torch.dtype,
                 grad_dtype: torch.dtype, is_expert: bool, group, group_size: int, group_rank: int,
                 group_name: str, bucket_size: Optional[int], distributed: bool, align: int,
                 scaling_factor: float):
        self.param_dtype, self.grad_dtype, self.is_expert = param_dtype, grad_dtype, is_expert
        self.group, self.group_size, self.group_rank, self.group_name = group, group_size, group_rank, group_name
        self.distributed, self.scaling_factor = distributed, scaling_factor
        self.params: List[torch.nn.Parameter] = []  # layout order
        self.slots: Dict[int, ParamSlot] = {}  # id(param) -> slot
        self.buckets: List[Bucket] = []

        align = align if distributed else 1
        bucket_multiple = math.lcm(group_size, align) if distributed else 1
        spans: List[Tuple[int, int, List[torch.nn.Parameter]]] = []
        offset, bucket_start, current = 0, 0, []

        def close_bucket():
            nonlocal offset, bucket_start, current
            if not current:
                return
            end = bucket_start + _round_up(offset - bucket_start, bucket_multiple)
            spans.append((bucket_start, end, current))
            offset, bucket_start, current = end, end, []

        for name, p in reversed(list(named_params)):
            # tied copies (embedding on two stages) get a bucket of their own, as in Megatron, so that
            # their shard ranges are the same on every stage and a grad all-reduce over the embedding
            # group stays correct after the reduce-scatter
            shared = bool(getattr(p, "shared", False) or getattr(p, "shared_embedding", False))
            if shared:
                close_bucket()
            offset = _round_up(offset, align)
            if not current:
                bucket_start = offset
            start, offset = offset, offset + p.numel()
            self.slots[id(p)] = ParamSlot(name, start, offset, len(spans))
            self.params.append(p)
            current.append(p)
            if shared or (bucket_size is not None and offset - bucket_start >= bucket_size):
                close_bucket()
        close_bucket()
        self.numel = offset
        self.numel_unpadded = sum(p.numel() for p in self.params)

        device = self.params[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = torch.zeros(self.numel, dtype=param_dtype, device=device) if distributed else None
        for p in self.params:
            s = self.slots[id(p)]
            if self.param_data is not None:
                view = self.param_data[s.start:s.end]
                view.copy_(p.data.reshape(-1))
                p.data = view.view(p.shape)
            p.main_grad = self.grad_data[s.start:s.end].view(p.shape)
        for i, (a, b, ps) in enumerate(spans):
            self.buckets.append(Bucket(self, i, a, b, ps))

    def bucket_of(self, p: torch.nn.Parameter) -> Bucket:
        return self.buckets[self.slots[id(p)].bucket]

    def zero(self, lazy: bool = False) -> None:
        """Zero the grads. ``lazy``: mark every param's main_grad stale instead of filling (the first write of
        the next step overwrites, tensor_parallel/wgrad.py; a bucket zeroes what is still stale before its
        reduction). Padding is never written, so it stays zero."""
        if lazy:
            for p in self.params:
                p.main_grad_stale = True
        else:
            self.grad_data.zero_()  # (a stale flag left by an earlier lazy zero only makes the next write copy_)
        for b in self.buckets:
            b.reset()
