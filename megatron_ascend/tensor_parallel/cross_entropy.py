"""Vocab-parallel cross-entropy: per-token loss from logits split over the vocabulary, never gathered.

``vocab_parallel_cross_entropy(logits [..., V/tp], target [...], groups) -> loss [...]`` (fp32, or fp64 for fp64 logits):
max-subtracted (all-reduce MAX), target logit picked on the owning rank (all-reduce SUM), sum of exp
(all-reduce SUM), ``loss = log(sum_exp) - target_logit``. Backward is ``softmax - onehot`` computed from
the saved softmax, so no collective runs in backward. Columns at or beyond ``vocab_size`` (vocab padding)
count as -inf; ``target < 0`` (ignore_index) and ``loss_mask == 0`` give loss 0 and no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .layers import tp_info
from .mappings import group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, rank, vocab_size):
        n = group_size(group)
        local_v = logits.shape[-1]
        start = rank * local_v
        # fp32 at least (bf16/fp16 logits are upcast; fp64 stays fp64 for exact tests)
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
        if vocab_size is not None and start + local_v > vocab_size:
            x[..., max(vocab_size - start, 0):] = float("-inf")
        m = x.max(dim=-1).values
        if n > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x.sub_(m.unsqueeze(-1))
        ignored = target < 0
        outside = (target < start) | (target >= start + local_v) | ignored
        local_t = (target - start).masked_fill(outside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        x.exp_()
        sum_exp = x.sum(dim=-1)
        if n > 1:
            both = torch.stack([picked, sum_exp])  # one all-reduce for both sums
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        loss = (torch.log(sum_exp) - picked).masked_fill(ignored, 0.0)
        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_t, outside, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, groups=None,
                                 vocab_size: Optional[int] = None, loss_mask: Optional[torch.Tensor] = None,
                                 group_name: str = "tp") -> torch.Tensor:
    """Per-token loss (fp32) with the shape of ``target``. ``logits`` is this rank's ``[..., V/tp]`` slice,
    ``vocab_size`` the true vocabulary (padded columns are ignored), ``loss_mask`` multiplies the loss."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree; "
                         f"logits must be target's shape plus a vocab dim")
    group, rank, _ = tp_info(groups, group_name)
    loss = _VocabParallelCrossEntropy.apply(logits, target, group, rank, vocab_size)
    if loss_mask is not None:
        loss = loss * loss_mask.to(loss.dtype)
    return loss
