"""Which sample indices each data-parallel rank reads, and the batched iterator over them.

Owns: :class:`PretrainingSampler` (Megatron's ``MegatronPretrainingSampler`` order), :func:`collate` and
:func:`build_data_iterator`. Does not own: shuffling (the datasets are already shuffled by their
indices, so the sampler is sequential and resumable by a single number).

Order: the sample stream 0, 1, 2, ... is cut into groups of ``micro_batch_size * dp``; in each group DP
rank r takes the contiguous slice ``[r * mbs, (r + 1) * mbs)``. A global batch of ``gbs`` samples is
``gbs / (mbs * dp)`` consecutive groups, i.e. that many micro-batches per rank. Resuming with
``consumed_samples = iterations * gbs`` continues the exact stream an uninterrupted run would have read.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import torch

from .errors import DataError


class PretrainingSampler:
    """Yields, per micro-batch, the list of ``micro_batch_size`` sample indices of this DP rank."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, global_batch_size: Optional[int] = None, drop_last: bool = True):
        if total_samples <= 0:
            raise DataError(f"the dataset has {total_samples} samples; there is nothing to train on")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataError(f"micro_batch_size {micro_batch_size} and data_parallel_size {data_parallel_size} "
                            f"must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} must be in [0, {data_parallel_size})")
        unit = micro_batch_size * data_parallel_size
        step = unit
        if global_batch_size is not None:
            if global_batch_size % unit:
                raise DataError(f"global-batch-size {global_batch_size} is not divisible by micro-batch-size "
                                f"{micro_batch_size} x data-parallel-size {data_parallel_size} = {unit}; use a "
                                f"multiple of {unit}")
            step = global_batch_size
        if consumed_samples < 0 or consumed_samples % unit:
            raise DataError(f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                            f"micro-batch-size x data-parallel-size = {unit} (it is iterations x global-batch-size)")
        if consumed_samples >= total_samples:
            raise DataError(f"consumed_samples {consumed_samples} is not below the {total_samples} samples of the "
                            f"dataset; the run has used all its data (raise --train-samples / --train-iters so "
                            f"the dataset is built larger)")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.rank, self.dp = micro_batch_size, data_parallel_rank, data_parallel_size
        self.global_batch_size, self.drop_last, self._unit, self._step = global_batch_size, drop_last, unit, step

    def _end(self) -> int:
        left = self.total_samples - self.consumed_samples
        return self.consumed_samples + (left // self._step) * self._step

    def __len__(self) -> int:
        n = (self._end() - self.consumed_samples) // self._unit
        if not self.drop_last and self._end() < self.total_samples:
            n += len(self._tail_groups())
        return n

    def _tail_groups(self) -> List[List[int]]:
        out = []
        for start in range(self._end(), self.total_samples, self._unit):
            group = list(range(start, min(start + self._unit, self.total_samples)))
            mine = group[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]
            if mine:
                out.append(mine)
        return out

    def __iter__(self) -> Iterator[List[int]]:
        mbs, r = self.micro_batch_size, self.rank
        for start in range(self.consumed_samples, self._end(), self._unit):
            yield list(range(start + r * mbs, start + (r + 1) * mbs))
        if not self.drop_last:
            yield from self._tail_groups()


def collate(samples: Sequence[dict]) -> dict:
    """Stack a list of per-sample dicts of equal-shape tensors into ``[b, ...]`` tensors."""
    if not samples:
        raise DataError("cannot collate an empty micro-batch")
    keys = samples[0].keys()
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


def build_data_iterator(dataset, sampler, num_workers: int = 0, pin_memory: bool = False,
                        collate_fn: Optional[Callable] = None, prefetch_factor: Optional[int] = None,
                        ) -> Iterator[dict]:
    """An iterator of collated micro-batches (``tokens/labels/loss_mask/position_ids [b, s]`` ...)."""
    kw = {}
    if num_workers > 0:
        kw["persistent_workers"] = True
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    # its own generator: DataLoader draws a worker base seed from the global RNG at every iter(), which would
    # shift the global RNG of a resumed run (the iterator is built after the checkpoint's RNG is restored)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, collate_fn=collate_fn or collate,
                                         generator=torch.Generator().manual_seed(0), **kw)
    return iter(loader)
