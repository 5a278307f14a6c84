"""Process groups: tensor, pipeline, data, context (room for later), expert, expert-tensor,
expert-data and embedding groups, built once from a ParallelConfig.

Rank layout is Megatron-Core's (order ``tp-cp-ep-dp-pp``: tp fastest, pp slowest). Two generators:

* dense:  sizes (tp, cp, dp, pp)            -> tp, cp, dp, pp, model-parallel (tp-pp), tp-dp-cp groups
* expert: sizes (etp, ep, edp, pp)          -> expert-tp, ep, expert-dp groups (MoE parallel folding)

Example, world 8, TP2 PP2 EP2 (DP2): stage 0 holds ranks 0-3; tp {0,1},{2,3},{4,5},{6,7};
dp {0,2},{1,3},{4,6},{5,7}; pp and embedding {0,4},{1,5},{2,6},{3,7}. With expert-tp = tp = 2 the ep groups
equal the dp groups and expert-dp groups are single ranks; with expert-tp 1 the ep groups are
{0,1},{2,3},{4,5},{6,7} and expert-dp {0,2},{1,3},{4,6},{5,7}.

``RankLayout`` is pure Python (no torch.distributed): tools/show_layout.py prints it before a job starts,
and tests compare it with the groups that ``initialize_model_parallel`` actually builds.
``ProcessGroups`` holds the live groups; modules receive it when they are built (no global lookups in
model code). ``get_process_groups()`` returns the default instance for scripts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .config import ParallelConfig

DENSE_AXES = ("tp", "cp", "dp", "pp")
# The group one loss is averaged over: the ranks that hold different tokens of the same model replica (data x
# context parallel). The global token count, the DDP reduction of dense gradients and the aux-loss scale all use
# it (``groups.loss``), so context parallelism changes nothing but this group's meaning.
LOSS_GROUP = "dp_cp"
EXPERT_AXES = ("etp", "ep", "edp", "pp")


def _orthogonal_groups(world: int, sizes: Sequence[int], mask: Sequence[bool]) -> List[List[int]]:
    """Groups of ranks that vary along the masked axes and agree on all others.

    ``sizes`` lists axes fastest first (stride 1 first): rank = sum(i_k * prod(sizes[:k])).
    """
    strides = [1]
    for s in sizes[:-1]:
        strides.append(strides[-1] * s)
    assert strides[-1] * sizes[-1] == world, (sizes, world)
    in_axes = [k for k, m in enumerate(mask) if m]
    out_axes = [k for k, m in enumerate(mask) if not m]

    def enumerate_axes(axes):
        idx = [0] * len(axes)
        total = 1
        for k in axes:
            total *= sizes[k]
        for _ in range(total):
            yield sum(i * strides[k] for i, k in zip(idx, axes))
            for j, k in enumerate(axes):  # increment, first axis fastest
                idx[j] += 1
                if idx[j] < sizes[k]:
                    break
                idx[j] = 0

    groups = []
    for base in enumerate_axes(out_axes):
        groups.append([base + off for off in enumerate_axes(in_axes)])
    return groups


@dataclass(frozen=True)
class RankLayout:
    """All group memberships for one ParallelConfig, computed without processes. ``embedding_pp_ranks``: the
    pipeline ranks holding a copy of the word embedding (``placement.Placement.embedding_pp_ranks``; default the
    first and the last)."""

    config: ParallelConfig
    embedding_pp_ranks: Optional[Tuple[int, ...]] = None

    def _dense(self, *axes: str) -> List[List[int]]:
        c = self.config
        sizes = [c.tp, c.cp, c.dp, c.pp]
        return _orthogonal_groups(c.world_size, sizes, [a in axes for a in DENSE_AXES])

    def _expert(self, *axes: str) -> List[List[int]]:
        c = self.config
        sizes = [c.etp, c.ep, c.edp, c.pp]
        return _orthogonal_groups(c.world_size, sizes, [a in axes for a in EXPERT_AXES])

    @property
    def tp(self):
        return self._dense("tp")

    @property
    def cp(self):
        return self._dense("cp")

    @property
    def dp(self):
        return self._dense("dp")

    @property
    def dp_cp(self):
        return self._dense("dp", "cp")

    @property
    def pp(self):
        return self._dense("pp")

    @property
    def mp(self):  # model parallel: tp x pp
        return self._dense("tp", "pp")

    @property
    def tp_dp_cp(self):
        return self._dense("tp", "dp", "cp")

    @property
    def etp(self):
        return self._expert("etp")

    @property
    def ep(self):
        return self._expert("ep")

    @property
    def edp(self):
        return self._expert("edp")

    @property
    def tp_ep(self):
        return self._expert("etp", "ep")

    @property
    def embedding(self):
        if self.embedding_pp_ranks is None:
            return [sorted({g[0], g[-1]}) for g in self.pp]
        return [sorted({g[i] for i in self.embedding_pp_ranks}) for g in self.pp]

    def all_groups(self) -> Dict[str, List[List[int]]]:
        if self._expert("pp") != self.pp:  # both generators must agree on pipeline groups
            raise AssertionError("dense and expert rank generators disagree on pipeline groups")
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "dp_cp": self.dp_cp, "pp": self.pp,
                "mp": self.mp, "tp_dp_cp": self.tp_dp_cp, "embedding": self.embedding,
                "etp": self.etp, "ep": self.ep, "edp": self.edp, "tp_ep": self.tp_ep}

    def coords(self, rank: int) -> Dict[str, int]:
        """Rank's index along each axis, e.g. {'tp': 1, 'cp': 0, 'dp': 0, 'pp': 1, 'ep': 0, ...}."""
        out = {}
        for name in ("tp", "cp", "dp", "pp", "etp", "ep", "edp"):
            for g in getattr(self, name):
                if rank in g:
                    out[name] = g.index(rank)
        return out

    def format(self) -> str:
        c = self.config
        lines = [f"world {c.world_size}: tp {c.tp} cp {c.cp} pp {c.pp} dp {c.dp} | "
                 f"expert: etp {c.etp} ep {c.ep} edp {c.edp}"]
        for name, groups in self.all_groups().items():
            lines.append(f"  {name:<10} " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups))
        for p, stage in enumerate(zip(*self.pp)):
            lines.append(f"  pp stage {p}: ranks {','.join(map(str, sorted(stage)))}")
        return "\n".join(lines)


@dataclass
class ProcessGroups:
    """Live process groups for this rank (plus its index and size in each)."""

    config: ParallelConfig
    rank: int
    groups: Dict[str, object] = field(default_factory=dict)  # name -> torch ProcessGroup
    ranks: Dict[str, List[int]] = field(default_factory=dict)  # name -> global ranks of this rank's group

    def group(self, name: str):
        return self.groups[name]

    def size(self, name: str) -> int:
        return len(self.ranks[name])

    def index(self, name: str) -> int:
        return self.ranks[name].index(self.rank)

    # readable shortcuts
    tp = property(lambda self: self.groups["tp"])
    pp = property(lambda self: self.groups["pp"])
    dp = property(lambda self: self.groups["dp"])
    cp = property(lambda self: self.groups["cp"])
    dp_cp = property(lambda self: self.groups["dp_cp"])
    ep = property(lambda self: self.groups["ep"])
    etp = property(lambda self: self.groups["etp"])
    edp = property(lambda self: self.groups["edp"])
    tp_dp_cp = property(lambda self: self.groups["tp_dp_cp"])
    embedding = property(lambda self: self.groups["embedding"])
    loss = property(lambda self: self.groups[LOSS_GROUP])  # the ranks one loss averages over (LOSS_GROUP)
    loss_size = property(lambda self: self.size(LOSS_GROUP))
    tp_rank = property(lambda self: self.index("tp"))
    tp_size = property(lambda self: self.size("tp"))
    pp_rank = property(lambda self: self.index("pp"))
    pp_size = property(lambda self: self.size("pp"))
    dp_rank = property(lambda self: self.index("dp"))
    dp_size = property(lambda self: self.size("dp"))
    ep_rank = property(lambda self: self.index("ep"))
    ep_size = property(lambda self: self.size("ep"))
    etp_rank = property(lambda self: self.index("etp"))
    etp_size = property(lambda self: self.size("etp"))
    edp_rank = property(lambda self: self.index("edp"))
    edp_size = property(lambda self: self.size("edp"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_DEFAULT: Optional[ProcessGroups] = None


def initialize_model_parallel(config: ParallelConfig, backend_group_options=None,
                              embedding_pp_ranks: Optional[Sequence[int]] = None) -> ProcessGroups:
    """Create every group (all ranks take part in every new_group call, as torch requires). The embedding group
    joins the pipeline ranks ``embedding_pp_ranks`` (the placement's; default the first and the last)."""
    import torch.distributed as dist
    from . import platform

    global _DEFAULT
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call platform.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != config.world_size:
        raise ValueError(f"ParallelConfig.world_size {config.world_size} != torch.distributed world size {world}")
    layout = RankLayout(config, None if embedding_pp_ranks is None else tuple(embedding_pp_ranks))
    pg = ProcessGroups(config=config, rank=rank)
    for name, groups in layout.all_groups().items():
        pg.groups[name], pg.ranks[name] = None, []  # e.g. middle pipeline stages hold no embedding group
        for ranks in groups:
            # platform.new_group: the job's process-group timeout (torch's subgroup default is 10 min on NCCL)
            handle = platform.new_group(ranks) if len(groups) > 1 or len(ranks) != world else dist.group.WORLD
            if rank in ranks:
                pg.groups[name] = handle
                pg.ranks[name] = list(ranks)
    _DEFAULT = pg
    return pg


def get_process_groups() -> ProcessGroups:
    if _DEFAULT is None:
        raise RuntimeError("process groups are not built; call initialize_model_parallel(config) first")
    return _DEFAULT


def destroy_model_parallel() -> None:
    global _DEFAULT
    _DEFAULT = None
