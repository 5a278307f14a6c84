"""Text report of a planning run: assumptions, ranked feasible layouts, memory breakdown, reference layouts."""
from __future__ import annotations

from typing import Dict, List, Optional

from ..config import ModelConfig
from .enumerate import MemoryOptions, Plan
from .layout import Cluster
from .memory import GIB, Precision, selective_modules
from .params import active_params, total_params
from .step_time import TimeOptions, model_flops_per_token


def _g(b: float) -> str:
    return f"{b / GIB:6.1f}"


def assumptions(cfg: ModelConfig, cluster: Cluster, seq: int, gbs: int, prec: Precision, topts: TimeOptions,
                mopts: MemoryOptions) -> List[str]:
    lines = [
        f"model: {cfg.model_type}, {total_params(cfg, include_mtp=False) / 1e9:.2f}B params "
        f"({total_params(cfg) / 1e9:.2f}B with MTP), {active_params(cfg) / 1e9:.2f}B active; "
        f"{model_flops_per_token(cfg, seq) / 1e9:.1f} GFLOP/token (fwd+bwd, Megatron formula, causal halved)",
        cluster_line(cluster),
        f"batch: seq {seq}, global batch {gbs} sequences ({seq * gbs / 1e6:.1f}M tokens/step)",
        f"bytes/param: param {prec.param}, grad {prec.grad}, main {prec.main_param}, optimizer {prec.optim} "
        f"(main+optimizer / dp with the distributed optimizer; experts / expert-dp); activations {prec.activation} B",
        f"time: compute at {topts.efficiency:.0%} of peak; exposed comm fraction tp {1 - topts.overlap_tp:.0%}, "
        f"ep {1 - topts.overlap_ep:.0%}, pp {1 - topts.overlap_pp:.0%}; dp grad/param sync "
        f"{'overlapped with the last backward / first forward' if topts.overlap_dp else 'exposed'}",
        f"memory: + {mopts.reserve_gib:g} GiB reserve per device, fits if <= {mopts.usable_fraction:.0%} of HBM; "
        f"{'fused (flash) attention' if mopts.flash_attention else 'unfused attention (s x s probabilities saved)'}",
        f"recompute: selective = {' + '.join(selective_modules(cfg))} (DeepSeek-V3's choice + MoE SwiGLU"
        f"{' + V4 mHC coefficients' if cfg.model_type == 'deepseek_v4' else ''}, as recompute.py frees them); "
        "full = uniform, 1 layer: layer inputs + one layer's working set",
    ]
    if cfg.model_type == "deepseek_v4":
        lines.append("V4 as models/deepseek_v4 builds it: parameters per rank exact, FLOPs as monitoring counts them, "
                     "activations by planner/memory_v4.py (mHC streams and mixings, sliding / CSA / HCA, reference "
                     "kernels; checked against the saved-tensor meter); TP splits heads / o_groups, kv and "
                     "compressors replicated")
    return lines


def cluster_line(cluster: Cluster) -> str:
    def mark(k: str) -> str:
        return "*" if k in cluster.overrides else ""
    src = "device table, platform/devices.py" if cluster.name != "custom" else "flags"
    over = "; * = set by a flag, not the table" if cluster.overrides and cluster.name != "custom" else ""
    return (f"cluster: {cluster.num_devices} x {cluster.name}, {cluster.tflops:g}{mark('tflops')} TFLOP/s bf16 peak, "
            f"{cluster.hbm_gib:g}{mark('hbm_gib')} GiB, {cluster.devices_per_node}{mark('devices_per_node')}/node, "
            f"intra {cluster.intra_node_gbps:g}{mark('intra_node_gbps')} GB/s, inter "
            f"{cluster.inter_node_gbps:g}{mark('inter_node_gbps')} GB/s, HBM {cluster.hbm_tbps:g}{mark('hbm_tbps')} "
            f"TB/s (from the {src}{over})")


def no_fit_line(plans: List[Plan], cluster: Cluster, mopts: MemoryOptions) -> str:
    """The one line plan.py prints when nothing fits: the smallest peak found against the usable HBM."""
    best = min(plans, key=lambda q: q.peak.total)
    usable = cluster.hbm_gib * mopts.usable_fraction
    return (f"no layout fits in {cluster.hbm_gib:g} GiB per device ({usable:.1f} GiB usable): the smallest peak is "
            f"{best.peak.total / GIB:.1f} GiB ({best.layout.short()}, stage {best.peak.stage}); add devices "
            f"(--num-devices) or use a device with more HBM")


def plan_row(p: Plan) -> str:
    pk = p.peak
    t = p.time
    ex = t.exposed
    return (f"{p.layout.short():<62} {t.tokens_per_s_per_device:8.0f} {t.model_tflops_per_device:6.0f} "
            f"{t.step_s:7.2f} {t.bubble_fraction:5.1%} {ex.get('tp', 0):5.2f} {ex.get('ep', 0):6.2f} "
            f"{ex.get('dp', 0):5.2f} | {_g(pk.total)} = st {_g(pk.states.total)} + act {_g(pk.activations)} "
            f"(stage {pk.stage})")


HEADER = (f"{'layout':<62} {'tok/s/dev':>8} {'TFLOPs':>6} {'step s':>7} {'bubbl':>5} {'tp s':>5} {'ep s':>6} "
          f"{'dp s':>5} | peak GiB = model states + activations")


def breakdown(p: Plan) -> List[str]:
    out = []
    for m in p.memory:
        s = m.states
        out.append(f"  stage {m.stage:2d}: params {m.params / 1e9:6.2f}B | params {_g(s.params)} grads {_g(s.grads)} "
                   f"main {_g(s.main_params)} optim {_g(s.optim)} | activations {_g(m.activations)} "
                   f"({m.inflight:g} micro-batches in flight) + reserve {_g(m.reserve)} = {_g(m.total)} GiB")
    return out


def format_report(title: str, lines_assume: List[str], plans: List[Plan], evaluated: int, rejected: int,
                  top: int, references: Optional[Dict[str, Plan]] = None,
                  reference_tps: Optional[float] = None) -> str:
    out = [f"== {title}", "assumptions:"] + ["  " + a for a in lines_assume]
    out.append(f"searched {evaluated} layouts: {rejected} break a config rule, {len(plans)} fit in memory")
    out.append(HEADER)
    for p in plans[:top]:
        out.append(plan_row(p))
    if plans:
        out.append(f"memory of the best layout ({plans[0].layout.short()}), per pipeline stage:")
        out += breakdown(plans[0])
    if references:
        out.append("reference layouts:")
        for name, p in references.items():
            rank = next((i + 1 for i, q in enumerate(plans) if q.layout == p.layout), None)
            where = (f", rank {rank} of {len(plans)} feasible" if rank else
                     (", outside the searched space" if p.feasible else ""))
            out.append(f"  {name}: {'fits' if p.feasible else 'does NOT fit'}{where}")
            out.append("    " + plan_row(p))
            if reference_tps:
                out.append(f"    predicted {p.time.tokens_per_s_per_device:.0f} tok/s/GPU vs {reference_tps:.0f} implied by "
                           f"the report: ratio {p.time.tokens_per_s_per_device / reference_tps:.2f}")
    return "\n".join(out)
