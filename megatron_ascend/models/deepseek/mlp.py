"""Dense SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (the first ``first_k_dense_replace``
layers; the MoE engineer reuses the same shape for shared experts in moe/).

TP: gate_proj / up_proj column-parallel, down_proj row-parallel; the input crosses into the TP region once
(all-gather along the sequence under SP, reduce-scatter on the way out). ``x [s(/tp), b, h] -> [s(/tp), b, h]``.
Selective recompute name: ``mlp`` (the whole block) -- see megatron_ascend.recompute.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...platform import kernels
from ...tensor_parallel import mappings as M
from ...tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, tp_info


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, groups=None, sequence_parallel: bool = False,
                 swiglu_limit: float = 0.0):
        super().__init__()
        self.group, _, tp = tp_info(groups)
        self.sp = sequence_parallel and tp > 1
        self.swiglu_limit = swiglu_limit
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, groups, skip_input_comm=True)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, groups, skip_input_comm=True)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, groups, sequence_parallel=self.sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:
            x = M.gather_from_sequence_parallel_region(x, self.group)
        else:
            x = M.copy_to_tensor_model_parallel_region(x, self.group)
        act = kernels.get("swiglu")(self.gate_proj(x), self.up_proj(x), self.swiglu_limit)
        return self.down_proj(act)
