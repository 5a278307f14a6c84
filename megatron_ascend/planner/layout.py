"""The two inputs of every planner formula: a Layout (how the job is split) and a Cluster (the machine).

Group placement follows the rank order of parallel_state (tp fastest, then cp, dp, pp; expert axes etp, ep,
edp, pp), so a group's stride in rank space says whether it stays inside one node.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..config import ConfigError, ParallelConfig
from ..platform.peak_flops import peak_tflops


@dataclass(frozen=True)
class Cluster:
    num_devices: int
    devices_per_node: int = 8
    tflops: float = 989.0  # dense bf16 peak per device
    hbm_gib: float = 80.0
    intra_node_gbps: float = 160.0  # GB/s per device, one direction (NVLink / HCCS)
    inter_node_gbps: float = 50.0  # GB/s per device (IB / RoCE NIC)
    hbm_tbps: float = 3.35  # HBM bandwidth, TB/s (optimizer step)
    name: str = "custom"

    @classmethod
    def from_device(cls, device: str, num_devices: int, **kw) -> "Cluster":
        tf = kw.pop("tflops", None) or peak_tflops(device)
        if tf is None:
            raise ConfigError(f"device {device!r} is not in platform.peak_flops; pass --tflops explicitly")
        return cls(num_devices=num_devices, tflops=tf, name=device, **kw)


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
    # 1f1b (interleaved when vp > 1) is what pipeline_parallel runs; "dualpipe" (DeepSeek-V3's bidirectional
    # schedule: each rank holds stages p and pp-1-p, bubble (pp/2-1)(F&B+B-3W), activations pp+1 micro-batches,
    # all-to-all hidden behind the overlapped chunk) is modelled only to compare with DeepSeek's report
    schedule: str = "1f1b"

    def __post_init__(self):
        if self.schedule not in ("1f1b", "dualpipe"):
            raise ValueError(f"schedule {self.schedule!r} is unknown; use 1f1b or dualpipe")
        if self.schedule == "dualpipe" and (self.vp != 1 or self.pp % 2):
            raise ValueError(f"dualpipe needs an even pipeline size and no virtual stages (pp {self.pp}, vp {self.vp})")

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
        if self.schedule != "1f1b":
            s += f" [{self.schedule}]"
        return s

    def replace(self, **kw) -> "Layout":
        return replace(self, **kw)


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
