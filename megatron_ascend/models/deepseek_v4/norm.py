"""V4's RMSNorm: weight kept in fp32 (as transformers' and DeepSeek's V4 code keep every norm weight), output in
the input's dtype: ``(w * x / rms(x)).to(x.dtype)``, computed in fp32. Same kernel as models/deepseek/norm.py
(equal to it when input and weight share a dtype)."""
from __future__ import annotations

import torch

from ...platform import kernels
from ..deepseek.norm import RMSNorm


class V4RMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__(dim, eps, sequence_parallel)
        self.weight.keep_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return kernels.get("rms_norm")(x, self.weight, self.eps)
        return kernels.get("rms_norm")(x.float(), self.weight.float(), self.eps).to(x.dtype)
