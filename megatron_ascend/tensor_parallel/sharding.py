"""How a parameter is sharded, recorded next to the parameter, and layout-independent initialisation.

Every parameter that is split across ranks carries ``param.shard`` (a ShardSpec): for each split tensor dim,
the group that splits it, this rank's index in it and the group size. The global tensor is the
concatenation of equal contiguous chunks along each split dim. ``param.is_expert`` marks expert weights
(grads reduced over expert-data-parallel instead of data-parallel; counted once per expert in the grad norm).
``param.tensor_model_parallel`` is True when the param is split over the tp (or etp) group, so a param that
is *not* marked is a TP duplicate (tp rank 0 counts it in the grad norm). ``param.sequence_parallel`` marks
replicated params whose grads are partial sums per TP rank under sequence parallel (norm weights), so the
DP wrapper all-reduces them over TP.

The checkpoint code and the HF adapter read these attributes; there is no second table.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class ShardSpec:
    # tensor dim -> (group name, index in group, group size)
    axes: Dict[int, Tuple[str, int, int]] = field(default_factory=dict)

    def global_shape(self, local_shape) -> Tuple[int, ...]:
        shape = list(local_shape)
        for d, (_, _, n) in self.axes.items():
            shape[d] *= n
        return tuple(shape)

    def offsets(self, local_shape) -> Tuple[int, ...]:
        off = [0] * len(local_shape)
        for d, (_, i, _) in self.axes.items():
            off[d] = i * local_shape[d]
        return tuple(off)

    def slices(self, local_shape) -> Tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offsets(local_shape), local_shape))


def mark_sharded(param: torch.Tensor, axes: Optional[Dict[int, Tuple[str, int, int]]] = None,
                 is_expert: bool = False, sequence_parallel: bool = False) -> torch.Tensor:
    """Record how ``param`` is split. Axes of size 1 are dropped (they do not split)."""
    axes = {d: a for d, a in (axes or {}).items() if a[2] > 1}
    param.shard = ShardSpec(axes)
    param.is_expert = is_expert
    param.tensor_model_parallel = any(a[0] in ("tp", "etp") for a in axes.values())
    param.sequence_parallel = sequence_parallel
    return param


def shard_spec(param: torch.Tensor) -> ShardSpec:
    return getattr(param, "shard", None) or ShardSpec()


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))
    return g


@torch.no_grad()
def init_normal_(param: torch.Tensor, name: str, std: float, seed: int, expert_dim: Optional[int] = None) -> None:
    """Fill this rank's shard of ``name`` with N(0, std) values that do not depend on the layout.

    The full tensor is drawn from a generator seeded by (seed, name) and sliced; for expert weights
    (``expert_dim`` = the dim that indexes experts) each expert ``name.{e}`` is drawn on its own, so a rank
    only generates its own experts."""
    spec = shard_spec(param)
    local = tuple(param.shape)
    if expert_dim is None:
        full = torch.empty(spec.global_shape(local), dtype=torch.float32)
        full.normal_(0.0, std, generator=_generator(seed, name))
        param.copy_(full[spec.slices(local)])
        return
    gshape = spec.global_shape(local)
    sl = spec.slices(local)
    e0 = sl[expert_dim].start
    per_shape = gshape[:expert_dim] + gshape[expert_dim + 1:]
    rest = sl[:expert_dim] + sl[expert_dim + 1:]
    for i in range(local[expert_dim]):
        full = torch.empty(per_shape, dtype=torch.float32)
        full.normal_(0.0, std, generator=_generator(seed, f"{name}.{e0 + i}"))
        param.select(expert_dim, i).copy_(full[rest])
