"""Data-parallel wrapper: contiguous grad buffers, bucketed reductions, overlap with backward.

Owns: ``DistributedDataParallel`` (one per model chunk): it groups the chunk's trainable params into
GradBuffers keyed by (param dtype, dense | expert), gives every param a ``main_grad`` view into its buffer,
registers post-accumulate-grad hooks that move ``param.grad`` into ``main_grad``, and reduces the buffers:

* dense params over the loss group (``pg.loss``, parallel_state.LOSS_GROUP: dp x cp, the ranks whose tokens
  the trainer's global token count sums over), expert params (``param.is_expert``) over expert-dp
  (``pg.edp``);
* all-reduce, or reduce-scatter into the rank's shard when ``use_distributed_optimizer`` (ZeRO-1; the
  optimizer then all-gathers the updated params through ``start_param_sync``);
* with ``overlap_grad_reduce`` a bucket's reduction is launched asynchronously from the backward hook as
  soon as all its grads have arrived (buckets of one group are launched in layout order on every rank, so
  ranks never disagree on the order of collectives; a bucket whose params got no grad is launched by
  ``finish_grad_sync``);
* after the dp reduction, grads of ``param.sequence_parallel`` params (replicated under SP, partial sums
  per TP rank) are all-reduced over ``pg.tp``. Under the distributed optimizer the owned shard is correct
  because the TP peers of a rank have the same dp index and an identical buffer layout.

Gradient scaling: ``'sum'`` (default) sums over dp, because the schedule already divides the loss by the
global-batch token count (docs/ARCHITECTURE.md "Loss normalisation"); ``'average'`` multiplies by 1/(dp x cp)
before the reduction (the loss group's size; dense and expert alike: an expert's grad summed over expert-dp already holds the
contributions of all dp ranks' tokens), for losses that are averaged per dp rank.

Gradient-accumulation fusion (``gradient_accumulation_fusion=True``, the default; Megatron's flag): params a
layer marked ``wgrad_fusable`` get ``fuse_wgrad`` and their weight-gradient GEMMs write into ``main_grad``
directly (tensor_parallel/wgrad.py); the hook then only drops the placeholder grad. ``zero_grad_buffer`` does
not fill: it marks every main_grad stale, the first write of the step overwrites (``copy_`` in the hook,
``mm(out=)`` in a fused backward), and each bucket zeroes the params still stale (no grad this step) before
its reduction. Off, every grad goes through autograd and ``main_grad.add_`` into a zero-filled buffer.

Microbatches: wrap all but the last backward in ``no_sync()`` (grads accumulate in ``main_grad``, nothing
is reduced); ``finish_grad_sync()`` completes the reduction (launching what is not yet launched) and is
idempotent until the next backward; ``zero_grad_buffer()`` clears the buffers before the next step.

Does not own: the optimizer (optimizer/), tied-embedding grad sync across pipeline stages (DeepSeek models
do not tie embeddings; a model that does must all-reduce over ``pg.embedding`` itself).

``groups=None`` means a single process: buffers and hooks exist, no collective is issued.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..parallel_state import LOSS_GROUP
from ..tensor_parallel.utils import allreduce_sequence_parallel_grads
from ..tensor_parallel.wgrad import accumulate_main_grad
from .grad_buffer import Bucket, GradBuffer

GRADIENT_SCALINGS = ("sum", "average")
DEFAULT_BUCKET_SIZE = 40_000_000


class DistributedDataParallel(nn.Module):
    """Wrap one model chunk. ``bucket_size`` in elements (None: one bucket per buffer without overlap,
    max(40M, 1M x dp) with overlap, as in Megatron); ``align`` (distributed optimizer only) pads each param
    start to that many elements and each bucket to a multiple of lcm(d, align)."""

    def __init__(self, module: nn.Module, groups=None, bucket_size: Optional[int] = None,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 grad_dtype: torch.dtype = torch.float32, gradient_scaling: str = "sum", align: int = 64,
                 gradient_accumulation_fusion: bool = True):
        super().__init__()
        if gradient_scaling not in GRADIENT_SCALINGS:
            raise ValueError(f"gradient_scaling {gradient_scaling!r} is unknown; use 'sum' or 'average'")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size {bucket_size} must be >= 1 element (or None for the default)")
        if align < 1:
            raise ValueError(f"align {align} must be >= 1 element")
        self.module = module
        self.groups = groups
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.grad_dtype = grad_dtype
        self.gradient_scaling = gradient_scaling

        dp_size = 1 if groups is None else groups.loss_size
        if bucket_size is None and overlap_grad_reduce:
            bucket_size = max(DEFAULT_BUCKET_SIZE, 1_000_000 * dp_size)
        self.bucket_size = bucket_size
        scale = 1.0 if gradient_scaling == "sum" else 1.0 / dp_size

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        keys: Dict[Tuple[torch.dtype, bool], List[Tuple[str, nn.Parameter]]] = {}
        for n, p in named:
            keys.setdefault((p.dtype, bool(getattr(p, "is_expert", False))), []).append((n, p))
        self.grad_buffers: List[GradBuffer] = []
        for (dtype, is_expert), params in keys.items():
            gname = "edp" if is_expert else LOSS_GROUP
            if groups is None:
                group, gsize, grank = None, 1, 0
            else:
                group, gsize, grank = groups.group(gname), groups.size(gname), groups.index(gname)
            self.grad_buffers.append(GradBuffer(
                params, param_dtype=dtype, grad_dtype=grad_dtype, is_expert=is_expert, group=group,
                group_size=gsize, group_rank=grank, group_name=gname, bucket_size=bucket_size,
                distributed=use_distributed_optimizer, align=align, scaling_factor=scale))
        self._buffer_of: Dict[int, GradBuffer] = {id(p): b for b in self.grad_buffers for p in b.params}
        # launch order per process group: buckets of all buffers reducing over that group, in layout order
        self._queues: Dict[str, List[Bucket]] = {}
        for b in self.grad_buffers:
            self._queues.setdefault(b.group_name, []).extend(b.buckets)
        self._next: Dict[str, int] = {k: 0 for k in self._queues}
        self._sp_params = [p for _, p in named if getattr(p, "sequence_parallel", False)]
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        for _, p in named:
            p.fuse_wgrad = gradient_accumulation_fusion and bool(getattr(p, "wgrad_fusable", False))
            p.grad_added_to_main_grad = False
        self._sync_enabled = True
        self._synced = True  # nothing to reduce yet
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook) for _, p in named]

    # -- forwarding ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, tensor):  # pipeline schedules call this on every chunk
        return self.module.set_input_tensor(tensor)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def buffer_of(self, p: nn.Parameter) -> GradBuffer:
        return self._buffer_of[id(p)]

    # -- hooks -----------------------------------------------------------------------------------------
    def _grad_hook(self, p: nn.Parameter) -> None:
        if p.grad is None:
            return
        if p.grad_added_to_main_grad:  # a fused backward wrote main_grad; p.grad is its placeholder
            p.grad_added_to_main_grad = False
        else:
            accumulate_main_grad(p, p.grad)
        p.grad = None
        self._synced = False
        if not (self.overlap_grad_reduce and self._sync_enabled):
            return
        buf = self._buffer_of[id(p)]
        bucket = buf.bucket_of(p)
        if bucket.launched:
            raise RuntimeError(f"gradient of {buf.slots[id(p)].name} arrived after its bucket was reduced "
                               f"(the param is used in two backward passes of one sync round); call the "
                               f"earlier backward passes inside ddp.no_sync()")
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.param_ids):
            self._launch_ready(buf.group_name)

    def _launch_ready(self, gname: str) -> None:
        q, i = self._queues[gname], self._next[gname]
        while i < len(q) and len(q[i].ready) == len(q[i].param_ids):
            q[i].start_grad_sync(async_op=True)
            i += 1
        self._next[gname] = i

    # -- microbatch control ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate grads into main_grad without launching reductions (all but the last microbatch)."""
        prev = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = prev

    def start_grad_sync(self) -> None:
        """Launch every bucket's reduction not yet launched (in layout order, asynchronously)."""
        for gname, q in self._queues.items():
            for b in q[self._next[gname]:]:
                b.start_grad_sync(async_op=True)
            self._next[gname] = len(q)

    def finish_grad_sync(self) -> None:
        """Complete the dp / expert-dp reduction and the SP all-reduce over tp. Idempotent until the next
        backward adds grads."""
        if self._synced:
            return
        self.start_grad_sync()
        for q in self._queues.values():
            for b in q:
                b.finish_grad_sync()
        allreduce_sequence_parallel_grads(self._sp_params, self.groups, grad_attr="main_grad")
        for q in self._queues.values():
            for b in q:
                b.reset()
        for k in self._next:
            self._next[k] = 0
        self._synced = True

    def zero_grad_buffer(self) -> None:
        """Zero every grad buffer and reset the bucket state (call before each step's first backward)."""
        for p in self._buffer_of_params():
            p.grad = None
        for b in self.grad_buffers:
            b.zero(lazy=self.gradient_accumulation_fusion)
        for k in self._next:
            self._next[k] = 0
        # lazily zeroed: the stale grads must still be zeroed (in the reduction) even if no backward runs
        self._synced = not self.gradient_accumulation_fusion

    def _buffer_of_params(self):
        for b in self.grad_buffers:
            yield from b.params

    # -- distributed optimizer -------------------------------------------------------------------------
    def start_param_sync(self) -> None:
        """All-gather the updated param shards of every bucket (distributed optimizer, after its step)."""
        if not self.use_distributed_optimizer:
            return
        for b in self.grad_buffers:
            for bucket in b.buckets:
                bucket.param_sync()

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Make every dp (expert-dp) replica equal to its rank 0 (the init is layout independent already;
        this is for models built from an unseeded init)."""
        if self.groups is None:
            return
        for b in self.grad_buffers:
            if b.group_size == 1:
                continue
            src = self.groups.ranks[b.group_name][0]
            for p in b.params:
                dist.broadcast(p.data, src=src, group=b.group)


def unwrap_model(model):
    """The module inside a DistributedDataParallel (or a list of them)."""
    if isinstance(model, (list, tuple)):
        return [unwrap_model(m) for m in model]
    return model.module if isinstance(model, DistributedDataParallel) else model
