"""The two inputs of every planner formula: a Layout (how the job is split) and a Cluster (the machine).

Group placement follows the rank order of parallel_state (tp fastest, then cp, dp, pp; expert axes etp, ep,
edp, pp), so a group's stride in rank space says whether it stays inside one node.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ..config import ConfigError, ParallelConfig
from ..platform.devices import DeviceSpec, device_spec


@dataclass(frozen=True)
class Cluster:
    """The machine: every figure comes from one platform.devices entry (``from_device``); ``overrides`` names the
    fields a caller replaced (plan.py's --hbm-gib etc.), so a report can mark them."""

    num_devices: int
    devices_per_node: int
    tflops: float  # dense bf16 peak per device
    hbm_gib: float
    intra_node_gbps: float  # GB/s per device, one direction (NVLink / HCCS / UB)
    inter_node_gbps: float  # GB/s per device, one direction (IB / RoCE NIC)
    hbm_tbps: float  # HBM bandwidth, TB/s (optimizer step)
    name: str = "custom"
    overrides: Tuple[str, ...] = ()

    FIGURES = DeviceSpec.FIGURES

    def __post_init__(self):
        for k in self.FIGURES:
            if not getattr(self, k) > 0:
                raise ConfigError(f"cluster {k} = {getattr(self, k)} must be positive")

    @classmethod
    def from_device(cls, device: str, num_devices: int, **overrides) -> "Cluster":
        """Every figure from the device table; each keyword that is not None replaces one (ConfigError for an
        unknown device or field)."""
        spec = device_spec(device)
        vals = spec.values()
        bad = sorted(set(overrides) - set(vals))
        if bad:
            raise ConfigError(f"{bad} are not device figures; use {', '.join(cls.FIGURES)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        vals.update(given)
        vals["devices_per_node"] = int(vals["devices_per_node"])
        return cls(num_devices=num_devices, name=spec.name, overrides=tuple(sorted(given)), **vals)

    def replace(self, **kw) -> "Cluster":
        """Replace figures (recorded in ``overrides``) or num_devices / name."""
        figs = tuple(sorted(set(self.overrides) | {k for k in kw if k in self.FIGURES}))
        return replace(self, overrides=figs, **kw)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sp: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full
    micro_batch_size: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    # 1f1b (interleaved when vp > 1) is what pipeline_parallel runs. Modelled only to compare with published runs:
    # "dualpipe" (DeepSeek-V3's bidirectional schedule: each rank holds stages p and pp-1-p, bubble
    # (pp/2-1)(F&B+B-3W), activations pp+1 micro-batches, all-to-all hidden behind the overlapped chunk) and
    # "dualpipev" (its V-shaped half, MindSpeed's --schedules-method dualpipev: pp ranks hold 2 pp stages,
    # rank p stages p and 2pp-1-p, no parameter copy; with --moe-fb-overlap the all-to-all is hidden the same way)
    schedule: str = "1f1b"
    # decoder layers of every pipeline stage in pipeline order (pp x vp stages; 2 x pp for dualpipev), when the
    # split is not Megatron's even / first-last one (e.g. Megatron-Bridge's "Et|(tt|)*30mL" = 1, 2 x 30, 0)
    layer_counts: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.schedule not in ("1f1b", "dualpipe", "dualpipev"):
            raise ValueError(f"schedule {self.schedule!r} is unknown; use 1f1b, dualpipe or dualpipev")
        if self.schedule == "dualpipe" and (self.vp != 1 or self.pp % 2):
            raise ValueError(f"dualpipe needs an even pipeline size and no virtual stages (pp {self.pp}, vp {self.vp})")
        if self.schedule == "dualpipev" and (self.vp != 1 or self.pp < 2):
            raise ValueError(f"dualpipev needs pipeline size >= 2 and no virtual stages (pp {self.pp}, vp {self.vp}); "
                             f"it makes 2 x pp stages itself")
        if self.layer_counts is not None:
            object.__setattr__(self, "layer_counts", tuple(int(c) for c in self.layer_counts))  # hashable
            stages = 2 * self.pp if self.schedule == "dualpipev" else self.pp * self.vp
            if len(self.layer_counts) != stages:
                raise ValueError(f"layer_counts has {len(self.layer_counts)} entries; this layout has {stages} stages")
            if self.first_stage_layers is not None or self.last_stage_layers is not None:
                raise ValueError("give layer_counts or first/last stage layers, not both")

    @property
    def custom_split(self) -> bool:
        """True when the stage split is not one ParallelConfig can express (layer_counts or dualpipev)."""
        return self.layer_counts is not None or self.schedule == "dualpipev"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    def to_parallel_config(self) -> ParallelConfig:
        return ParallelConfig(world_size=self.world, tensor_model_parallel_size=self.tp,
                              pipeline_model_parallel_size=self.pp,
                              virtual_pipeline_model_parallel_size=self.vp if self.vp > 1 else None,
                              expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.etp,
                              sequence_parallel=self.sp, use_distributed_optimizer=self.distributed_optimizer,
                              decoder_first_pipeline_num_layers=self.first_stage_layers,
                              decoder_last_pipeline_num_layers=self.last_stage_layers)

    @classmethod
    def from_parallel_config(cls, par: ParallelConfig, recompute: str = "none", micro_batch_size: int = 1) -> "Layout":
        return cls(tp=par.tp, pp=par.pp, vp=par.virtual_pipeline_model_parallel_size or 1, ep=par.ep, etp=par.etp,
                   dp=par.dp, sp=par.sequence_parallel, distributed_optimizer=par.use_distributed_optimizer,
                   recompute=recompute, micro_batch_size=micro_batch_size,
                   first_stage_layers=par.decoder_first_pipeline_num_layers,
                   last_stage_layers=par.decoder_last_pipeline_num_layers)

    def short(self) -> str:
        s = f"TP{self.tp} PP{self.pp}"
        if self.vp > 1:
            s += f" VP{self.vp}"
        s += f" EP{self.ep}"
        if self.etp != 1:
            s += f" ETP{self.etp}"
        s += f" DP{self.dp}"
        if self.sp:
            s += " SP"
        s += " distopt" if self.distributed_optimizer else ""
        s += f" rc={self.recompute} mbs{self.micro_batch_size}"
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            s += f" first/last={self.first_stage_layers}/{self.last_stage_layers}"
        if self.layer_counts is not None:
            s += " layers=" + format_layer_counts(self.layer_counts)
        if self.schedule != "1f1b":
            s += f" [{self.schedule}]"
        return s

    def replace(self, **kw) -> "Layout":
        return replace(self, **kw)


def format_layer_counts(counts) -> str:
    """Run-length form of per-stage layer counts: (1, 2, 2, 2, 0) -> '1:2*3:0' (plan.py --layout layers=)."""
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]}*{j - i}" if j - i > 1 else str(counts[i]))
        i = j
    return ":".join(out)


def parse_layer_counts(text: str) -> Tuple[int, ...]:
    """Inverse of format_layer_counts ('4*15:1' -> fifteen 4s and a 1)."""
    out = []
    for part in text.split(":"):
        try:
            if "*" in part:
                a, n = part.split("*")
                out += [int(a)] * int(n)
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"layers={text!r}: write per-stage layer counts as N or N*repeat joined by ':', "
                              f"e.g. 1:2*30:0") from None
    return tuple(out)


# strides in rank space (Megatron order tp-cp-dp-pp; expert order etp-ep-edp-pp)
def group_stride(layout: Layout, group: str) -> int:
    t = layout
    return {"tp": 1, "dp": t.tp, "pp": t.tp * t.dp, "ep": t.etp, "etp": 1, "edp": t.etp * t.ep,
            "embedding": t.tp * t.dp * max(t.pp - 1, 1)}[group]


def group_size(layout: Layout, group: str) -> int:
    t = layout
    return {"tp": t.tp, "dp": t.dp, "pp": t.pp, "ep": t.ep, "etp": t.etp, "edp": t.edp,
            "embedding": 2 if t.pp > 1 else 1}[group]


def nodes_spanned(layout: Layout, group: str, devices_per_node: int) -> int:
    """How many nodes one group of this kind touches (1 = all NVLink / HCCS)."""
    size, stride = group_size(layout, group), group_stride(layout, group)
    span = (size - 1) * stride + 1
    if span <= devices_per_node:
        return 1
    if stride >= devices_per_node:
        return size
    return -(-span // devices_per_node)
