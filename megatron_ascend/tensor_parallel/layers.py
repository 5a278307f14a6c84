"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Each layer takes ``groups`` (a parallel_state.ProcessGroups, or None for one process) and records the
sharding of its parameters with ``sharding.mark_sharded`` next to them. Weights are created empty; the
model initialises them by global name (``sharding.init_normal_``) so the result does not depend on the
layout. Activations are ``[s, b, h]``; under sequence parallel a rank holds ``[s/tp, b, h]`` at the input
of a column-parallel layer and at the output of a row-parallel one.

The column / row / embedding weights are marked ``wgrad_fusable``: their weight gradients go straight into ``main_grad``
under the DDP wrapper's gradient-accumulation fusion (wgrad.py).

Does not own: expert layers (moe/), the all-to-all dispatch, initialisation values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import mappings as M
from .sharding import mark_sharded
from .wgrad import embedding, linear, mark_wgrad_fusable


def tp_info(groups, name: str = "tp") -> Tuple[object, int, int]:
    """(torch group or None, rank in it, size) of the ``name`` group; (None, 0, 1) without groups."""
    if groups is None:
        return None, 0, 1
    return groups.group(name), groups.index(name), groups.size(name)


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what} {n} is not divisible by tensor-parallel size {d}; pick a TP size that divides {n}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by output rows: weight ``[out/tp, in]``, output ``[..., out/tp]``.

    Input: ``[s, b, in]`` (replicated) or ``[s/tp, b, in]`` with ``sequence_parallel`` (all-gathered here,
    reduce-scattered in backward). ``skip_input_comm=True`` skips the input copy_to (the caller already
    placed the region boundary). ``gather_output`` all-gathers the last dim.
    """

    def __init__(self, input_size: int, output_size: int, groups=None, bias: bool = False,
                 gather_output: bool = False, sequence_parallel: bool = False, group_name: str = "tp",
                 skip_input_comm: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.group, rank, size = tp_info(groups, group_name)
        self.tp_size = size
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _divide(output_size, size, "output size")
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel and size > 1
        self.skip_input_comm = skip_input_comm
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=dtype))
        mark_sharded(self.weight, {0: (group_name, rank, size)})
        mark_wgrad_fusable(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=dtype))
            mark_sharded(self.bias, {0: (group_name, rank, size)})
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = M.gather_from_sequence_parallel_region(x, self.group)
        elif not self.skip_input_comm:
            x = M.copy_to_tensor_model_parallel_region(x, self.group)
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = M.gather_from_tensor_model_parallel_region(y, self.group)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (/{self.tp_size}), "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by input columns: weight ``[out, in/tp]``.

    Input ``[..., in/tp]`` (``input_is_parallel``) or ``[..., in]`` (scattered here). The partial outputs are
    all-reduced, or reduce-scattered along dim 0 under ``sequence_parallel`` (output ``[s/tp, b, out]``).
    The bias is added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, groups=None, bias: bool = False,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, group_name: str = "tp",
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.group, rank, size = tp_info(groups, group_name)
        self.tp_size = size
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, size, "input size")
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel and size > 1
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=dtype))
        mark_sharded(self.weight, {1: (group_name, rank, size)})
        mark_wgrad_fusable(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype))
            mark_sharded(self.bias, None, sequence_parallel=self.sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = M.scatter_to_tensor_model_parallel_region(x, self.group)
        y = linear(x, self.weight)
        if self.sequence_parallel:
            y = M.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = M.reduce_from_tensor_model_parallel_region(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (/{self.tp_size}), out={self.output_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split over TP: weight ``[V/tp, h]``, rank r owns rows
    ``[r*V/tp, (r+1)*V/tp)``. ``forward(ids [b, s]) -> [s, b, h]`` (``[s/tp, b, h]`` under sequence parallel):
    ids outside the shard give zeros, then the partial results are all-reduced (or reduce-scattered)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, groups=None, sequence_parallel: bool = False,
                 group_name: str = "tp", dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.group, rank, size = tp_info(groups, group_name)
        self.tp_size = size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = _divide(num_embeddings, size, "padded vocab size")
        self.vocab_start, self.vocab_end = rank * per, (rank + 1) * per
        self.sequence_parallel = sequence_parallel and size > 1
        self.weight = nn.Parameter(torch.empty(per, embedding_dim, dtype=dtype))
        mark_sharded(self.weight, {0: (group_name, rank, size)})
        mark_wgrad_fusable(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.t()  # [s, b]
        if self.tp_size > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            if self.sequence_parallel:
                return M.reduce_scatter_to_sequence_parallel_region(out, self.group)
            return M.reduce_from_tensor_model_parallel_region(out, self.group)
        return embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (/{self.tp_size}), {self.embedding_dim}"
