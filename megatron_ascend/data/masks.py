"""Attention masks from per-token ``segment_ids``, the packing contract between data and model.

A batch may carry ``segment_ids [b, s]`` (int64): tokens attend causally and only to tokens with the
same segment id. Within a row segment ids are non-decreasing and contiguous (packed samples 0, 1, ...,
then one segment of padding), and ``position_ids`` restart at 0 at each segment start, so a packed
row computes exactly what its samples would compute one by one. A batch without ``segment_ids`` is
plain causal.
"""
from __future__ import annotations

import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` (or ``[s]``) segment ids -> bool ``[b, 1, s, s]``, True where query i may attend key j
    (j <= i and same segment). Note the polarity: Megatron's ``attention_mask`` is True where *masked*;
    this is ``~attention_mask``."""
    if segment_ids.dim() == 1:
        segment_ids = segment_ids.unsqueeze(0)
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths ``[num_segments + 1]`` int32 of one row (for varlen attention kernels)."""
    if segment_ids.dim() != 1:
        raise ValueError(f"cu_seqlens takes one row of segment ids [s], got shape {tuple(segment_ids.shape)}")
    change = torch.nonzero(segment_ids[1:] != segment_ids[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=change.dtype, device=segment_ids.device)
    end = torch.full((1,), segment_ids.numel(), dtype=change.dtype, device=segment_ids.device)
    return torch.cat([zero, change, end]).to(torch.int32)
