"""The planner checked against published DeepSeek-V3 training runs (``tools/plan.py --validate``).

Each ``PublishedRun`` is a run whose layout we could find in its source: the published throughput (with the
arithmetic when it is implied), the device, batch and sequence, and one or more ``Candidate`` layouts the
planner evaluates: the published layout and schedule where the planner models them, else the nearest it can,
with what it assumes instead in ``note``. Nothing here is fitted: the planner's constants (50 % kernel
efficiency, the device table's peaks) are the ones every plan uses; docs/PLANNER.md explains the ratios.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import ModelConfig
from .enumerate import MemoryOptions, Plan, evaluate
from .layout import Cluster, Layout
from .memory import GIB, Precision
from .presets import V3_REPORT_GPU_HOURS, V3_REPORT_TOKENS, deepseek_v3
from .step_time import TimeOptions


@dataclass(frozen=True)
class Candidate:
    label: str
    layout: Layout
    time: TimeOptions = TimeOptions()
    note: str = ""


@dataclass(frozen=True)
class PublishedRun:
    key: str
    title: str
    source: str
    model: ModelConfig
    device: str
    num_devices: int
    seq_length: int
    global_batch_size: int
    precision: str
    published: Tuple[Tuple[str, float], ...]  # (reading, tokens/s per device); several when the unit is unclear
    published_text: str
    candidates: Tuple[Candidate, ...]
    cluster_overrides: Dict[str, float] = field(default_factory=dict)
    published_tflops: Optional[float] = None
    notes: Tuple[str, ...] = ()

    def cluster(self) -> Cluster:
        return Cluster.from_device(self.device, self.num_devices, **self.cluster_overrides)


V3_IMPLIED = V3_REPORT_TOKENS / (V3_REPORT_GPU_HOURS * 3600)  # 1,543.2 tokens/s per GPU
MINDSPEED_A3 = 914.97  # docs/zh/pytorch/features/README.md, '吞吐（tokens/s）' column


def published_runs() -> Tuple[PublishedRun, ...]:
    v3 = deepseek_v3()
    ds = Layout(tp=1, pp=16, ep=64, dp=128, distributed_optimizer=True, recompute="selective",
                first_stage_layers=4, last_stage_layers=1)
    ds_time = TimeOptions(dispatch_bytes=1, ep_node_limit=4)
    mb = Layout(tp=2, pp=8, vp=4, ep=64, etp=1, dp=64, sp=True, distributed_optimizer=True, recompute="selective",
                layer_counts=(1,) + (2,) * 30 + (0,))
    ms = Layout(tp=2, pp=8, ep=32, etp=1, dp=32, sp=True, distributed_optimizer=True, recompute="full",
                schedule="dualpipev", layer_counts=(4,) * 15 + (1,))
    return (
        PublishedRun(
            "deepseek-v3-h800", "DeepSeek-V3 pre-training, 2,048 H800",
            "DeepSeek-V3 technical report (arXiv 2412.19437) §1 Table 1 and §3.2 "
            "(performance_reliability_anchors.md §A1)",
            v3, "H800", 2048, 4096, 15360, "bf16-bf16moments",
            (("per GPU", V3_IMPLIED),),
            f"14.8e12 tokens / (2.664e6 GPU-h x 3600 s) = {V3_IMPLIED:,.1f} tok/s/GPU (same as 1e12 / (180e3 x 3600))",
            (Candidate("exact: TP1 PP16 EP64 ZeRO-1, DualPipe, recompute RMSNorm + MLA up-proj, FP8 dispatch, "
                       "4-node routing", ds.replace(schedule="dualpipe"), ds_time,
                       "the report's split of 61 layers over 16 stages is not published: first 4, last 1 assumed; "
                       "our selective set also recomputes the MoE SwiGLU; FP8 GEMMs and FP8 activation caching are "
                       "not modelled (bf16 compute at 50 % of the bf16 peak, bf16 activations)"),
             Candidate("nearest that fits the planner's memory model: same, full recompute",
                       ds.replace(schedule="dualpipe", recompute="full"), ds_time,
                       "full recompute adds a forward of every layer (FLOPs the report does not spend)"),
             Candidate("as megatron_ascend runs that layout: 1F1B, all-to-all exposed, bf16 dispatch, full recompute",
                       ds.replace(recompute="full"), TimeOptions(),
                       "what this library would do with DeepSeek's layout today (no DualPipe, no DeepEP)")),
            notes=("global batch: the report ramps 3,072 -> 15,360 over the first 469B tokens; 15,360 assumed",
                   "the 2.664M GPU-hours include every stall and restart; a planner step time has none")),
        PublishedRun(
            "megatron-bridge-h100", "Megatron-Core DeepSeek-V3 pre-training, 1,024 H100 (NeMo 25.09)",
            "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md, '25.09 NeMo Container', DGX-H100 table; layout "
            "from scripts/performance/configs/deepseek/deepseek_workload_base_configs.py "
            "DEEPSEEK_V3_PRETRAIN_CONFIG_H100_V1",
            v3, "H100", 1024, 4096, 8192, "bf16",
            (("per GPU", 1297.0),), "1,297 tok/s/GPU and 338 model TFLOP/s/GPU as published (FP8 recipe; "
                                    "330 with DeepSeek's blockwise FP8 scaling)",
            (Candidate("exact layout: TP2 PP8 VP4 EP64 SP, distopt, pp_layout Et|(tt|)*30mL, interleaved 1F1B, "
                       "all-to-all not overlapped, HybridEP (4-node routing)", mb,
                       TimeOptions(ep_node_limit=4),
                       "recompute mla_up_proj + mlp (dense MLP of the 3 dense layers): nearest is our selective "
                       "set (layernorm + mla_up_proj + moe_act); group-limited routing (8 groups, top-4) puts each "
                       "token on <= 4 of the 8 nodes and HybridEP sends it once per node: modelled as node-limited 4; "
                       "FP8 GEMMs not modelled (bf16 compute at 50 % of the bf16 peak), bf16 dispatch"),),
            published_tflops=338.0,
            notes=("the table's footnote: MoE benchmarks force-balance the tokens among experts "
                   "(--moe-router-force-load-balancing); the planner's uniform routing is the same assumption",)),
        PublishedRun(
            "mindspeed-a3", "MindSpeed-LLM DeepSeek-V3 pre-training, 512 Atlas 900 A3 SuperPoD devices",
            "Ascend/MindSpeed-LLM docs/zh/pytorch/features/README.md '分布式预训练' table (914.97, column "
            "'吞吐（tokens/s）', cluster 32x16); layout from "
            "examples/mcore/deepseek3/pretrain_deepseek3_671b_4k_A3_ptd.sh",
            v3, "Ascend910C", 512, 4096, 3840, "bf16",
            (("if per die", MINDSPEED_A3), ("if per 910C package (2 dies)", MINDSPEED_A3 / 2)),
            "914.97 'tokens/s' for 32 nodes x 16 devices; the table does not say per what. Read per die, the "
            "Qwen3-8B row of the same table (7,617 tokens/s on 1x16) would need ~99 % of a die's bf16 peak, so "
            "per 910C package (2 dies) = 457.5 tok/s/die is the likelier reading; both shown",
            (Candidate("exact: TP2 PP8 EP32 SP, DualPipeV + fb-overlap, full recompute, distopt, 64 layers with "
                       "noop 61-63 (16 V stages of 4, the last 1)", ms, TimeOptions(),
                       "--swap-optimizer (optimizer states in host memory) is not modelled: they are counted on "
                       "the device; fb-overlap is modelled as a fully hidden all-to-all; no NPU kernel efficiency "
                       "is known, so 50 % of the 376 TFLOP/s die peak as everywhere"),),
            cluster_overrides={"inter_node_gbps": 196.0},
            notes=("an A3 SuperPoD joins every die with UB: inter-node bandwidth set to the intra-node 196 GB/s",)),
    )


@dataclass
class Row:
    run: PublishedRun
    candidate: Candidate
    plan: Plan
    cluster: Cluster

    def ratios(self) -> List[Tuple[str, float]]:
        got = self.plan.time.tokens_per_s_per_device
        return [(label, got / v) for label, v in self.run.published]


def validate(runs: Optional[Tuple[PublishedRun, ...]] = None, efficiency: Optional[float] = None) -> List[Row]:
    rows = []
    for run in runs or published_runs():
        cl = run.cluster()
        for c in run.candidates:
            t = c.time if efficiency is None else TimeOptions(**{**c.time.__dict__, "efficiency": efficiency})
            plan = evaluate(run.model, c.layout, cl, run.seq_length, run.global_batch_size,
                            Precision.named(run.precision), t, MemoryOptions())
            rows.append(Row(run, c, plan, cl))
    return rows


def format_validation(rows: List[Row]) -> str:
    out = ["| run | planner layout / schedule | fits? peak GiB / HBM | predicted tok/s/dev (TFLOP/s) | "
           "published tok/s/dev | predicted / published |", "|---|---|---|---|---|---|"]
    for r in rows:
        p, run = r.plan, r.run
        pub = "; ".join(f"{v:,.1f} ({label})" for label, v in run.published)
        if run.published_tflops:
            pub += f", {run.published_tflops:g} TFLOP/s"
        ratio = "; ".join(f"{x:.2f} ({label})" if len(run.published) > 1 else f"{x:.2f}" for label, x in r.ratios())
        fits = f"{'yes' if p.feasible else 'NO'} {p.peak.total / GIB:.1f} / {r.cluster.hbm_gib:g}"
        out.append(f"| {run.title} | {r.candidate.label} | {fits} | {p.time.tokens_per_s_per_device:,.0f} "
                   f"({p.time.model_tflops_per_device:.0f}) | {pub} | {ratio} |")
    out.append("")
    seen = set()
    for r in rows:
        run = r.run
        if run.key not in seen:
            seen.add(run.key)
            cl = r.cluster
            out.append(f"{run.title}: {run.source}.")
            out.append(f"  published: {run.published_text}.")
            out.append(f"  cluster: {cl.num_devices} x {cl.name}, {cl.tflops:g} TFLOP/s, {cl.hbm_gib:g} GiB, "
                       f"{cl.devices_per_node}/node, intra {cl.intra_node_gbps:g} GB/s, inter {cl.inter_node_gbps:g} "
                       f"GB/s, HBM {cl.hbm_tbps:g} TB/s; seq {run.seq_length}, global batch {run.global_batch_size}, "
                       f"precision {run.precision}")
            for n in run.notes:
                out.append(f"  note: {n}")
        t = r.plan.time
        out.append(f"  - {r.candidate.label}: {r.plan.layout.short()}; step {t.step_s:.2f} s, bubble "
                   f"{t.bubble_fraction:.1%}, exposed tp {t.exposed.get('tp', 0):.2f} s / ep "
                   f"{t.exposed.get('ep', 0):.2f} s / dp {t.exposed.get('dp', 0):.2f} s")
        if r.candidate.note:
            out.append(f"    assumes: {r.candidate.note}")
    return "\n".join(out)
