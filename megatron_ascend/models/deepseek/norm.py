"""RMSNorm (DeepSeek/HF form: fp32 statistics, cast back, then scale) through the kernel table."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...platform import kernels
from ...tensor_parallel.sharding import mark_sharded


class RMSNorm(nn.Module):
    """``weight [dim]`` (replicated). ``sequence_parallel=True`` marks the weight when the norm sees only this
    rank's tokens (its grad is then a partial sum that the DDP wrapper all-reduces over TP)."""

    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        mark_sharded(self.weight, None, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.get("rms_norm")(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
