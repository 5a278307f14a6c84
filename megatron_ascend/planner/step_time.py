"""Step time of a layout: compute at an assumed kernel efficiency, exposed communication, pipeline bubble.

FLOPs: the planner's own per-layer implementation of Megatron's ``num_floating_point_operations`` extended
to MLA, the V3.2 indexer, MoE and MTP, so that each pipeline stage can be costed separately; tests/test_planner.py
asserts that the per-layer sum equals monitoring.flops.model_flops_per_token for V2-Lite, V3, V3.2 (two
independent implementations of one formula). DeepSeek-V4 layers take monitoring.flops.v4_layer_macs (checked
against torch's FlopCounterMode on the built model by tests/test_planner_v4.py); the sum is still compared.

Model:
  t_mb(p)  = F_mb(p) / (peak x efficiency) + exposed TP / EP / PP time of one micro-batch on stage p
  t_pipe   = (m + (pp - 1) / vp) x max_p t_mb(p)          (bubble fraction (p-1)/(v m + p - 1))
             DualPipe (pp ranks, stages p and pp-1-p, m/2 micro-batches each way): (m + (pp/2 - 1) 2/3) x t_mb
             DualPipeV (pp ranks, 2 pp stages in a V, t_mb = both chunks): (m + (pp - 1) / 3) x t_mb; both
             with the expert all-to-all hidden behind the overlapped forward & backward chunks
  t_dp     = grad reduce not hidden behind the last micro-batch's backward (2/3 t_mb) + the param all-gather
             not hidden behind the next first forward (1/3 t_mb); both fully exposed when overlap is off
  t_opt    = bytes the Adam step touches / HBM bandwidth
  t_step   = t_pipe + t_dp + t_embedding + t_opt
Recompute adds its re-run forward FLOPs (full: the whole layer forward; selective: the recomputed pieces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import ModelConfig
from ..monitoring.flops import v4_indexer_flops, v4_layer_macs
from .comm import CommOptions, collective_seconds, ep_seconds, rank_step_volume
from .layout import Cluster, Layout
from .params import ParamCount, StageSplit, padded_vocab

FMA, FWD_BWD = 2, 3


def _keys(s: int, window: Optional[int] = None) -> float:
    if not window or window >= s:
        return s / 2.0
    w = float(window)
    return (w * (w + 1) / 2.0 + (s - w) * w) / s


def attention_macs(cfg: ModelConfig, s: int, layer_idx: int, mtp_block: bool = False) -> Dict[str, float]:
    """Forward multiply-accumulates per token of one attention sublayer: {'proj': ..., 'core': ...} (+ 'up_proj':
    what selective mla_up_proj recomputes). V4: 'proj' also holds the compressor and both mHC mixings, plus
    'indexer_proj' / 'indexer_scores' (how often they run: monitoring.flops.v4_indexer_flops) and 'mhc_coeff'
    (the mixing-coefficient projections selective mhc recomputes); MTP layer k is global layer
    num_hidden_layers + k."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.model_type == "deepseek_v4":
        t = v4_layer_macs(cfg, s, layer_idx)
        m = cfg.hc_mult
        # mla_up_proj re-runs q_b_proj twice (core attention's backward and its own); mhc the coefficients once
        return {"proj": t["proj"] + t["compressor"] + t["mhc"], "core": t["core"],
                "indexer_proj": t["indexer_proj"], "indexer_scores": t["indexer_scores"],
                "up_proj": 2 * cfg.q_lora_rank * n * cfg.head_dim, "mhc_coeff": 2 * (2 + m) * m * m * h}
    d_nope, d_rope, d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qk = d_nope + d_rope
    if cfg.q_lora_rank:
        q_up = cfg.q_lora_rank * n * qk
        proj = cfg.q_lora_rank * (h + 1) + q_up
    else:
        q_up = 0
        proj = h * n * qk
    kv_up = cfg.kv_lora_rank * n * (d_nope + d_v)
    proj += cfg.kv_lora_rank * (h + 1) + kv_up + h * d_rope + n * d_v * h
    keys = _keys(s)
    if cfg.has_indexer:
        nh, d = cfg.index_n_heads, cfg.index_head_dim
        proj += (cfg.q_lora_rank or h) * nh * d + h * d + d + h * nh + keys * nh * d
        if cfg.index_topk < s:
            keys = _keys(s, cfg.index_topk)
    core = keys * n * qk + keys * n * d_v
    return {"proj": proj, "core": core, "up_proj": q_up + kv_up}


def ffn_macs(cfg: ModelConfig, layer_idx: int, mtp_block: bool = False) -> float:
    h = cfg.hidden_size
    if cfg.model_type == "deepseek_v4":
        moe = True
    else:
        moe = cfg.is_moe_layer(cfg.num_hidden_layers - 1 if mtp_block else layer_idx)
    if not moe:
        return 3 * h * cfg.intermediate_size
    return 3 * h * (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size


def layer_flops(cfg: ModelConfig, s: int, layer_idx: int, mtp_block: bool = False) -> float:
    """Training FLOPs per token of one decoder layer (fwd + bwd = 3 x 2 x MACs; a V4 indexer without its loss
    runs forward only)."""
    a = attention_macs(cfg, s, layer_idx, mtp_block)
    idx = v4_indexer_flops(cfg, a) if "indexer_proj" in a else 0.0
    return FWD_BWD * FMA * (a["proj"] + a["core"] + ffn_macs(cfg, layer_idx, mtp_block)) + idx


def head_flops(cfg: ModelConfig, vocab: Optional[int] = None) -> float:
    """One output head (V4: with the hc_head collapse projection before it)."""
    hc = cfg.hc_mult * cfg.hc_mult if cfg.model_type == "deepseek_v4" else 0
    return FWD_BWD * FMA * cfg.hidden_size * ((vocab or cfg.vocab_size) + hc)


def mtp_extra_flops(cfg: ModelConfig) -> float:
    """One MTP depth besides its decoder layer and head: V3 eh_proj [2h -> h] + 3 norms; V4 e_proj [h -> h] and
    h_proj applied to each of the n streams."""
    h = cfg.hidden_size
    if cfg.model_type == "deepseek_v4":
        return FWD_BWD * FMA * (1 + cfg.hc_mult) * h * h
    return FWD_BWD * FMA * (3 * h + 2 * h * h)


def mtp_layer_flops(cfg: ModelConfig, s: int, recompute: str = "none") -> float:
    """Every MTP depth's decoder layer and extra projections (depth k is global layer num_hidden_layers + k)."""
    L = cfg.num_hidden_layers
    return sum(layer_flops(cfg, s, L + k, True) + recompute_flops(cfg, s, L + k, recompute, True)
               + mtp_extra_flops(cfg) for k in range(cfg.num_nextn_predict_layers))


def model_flops_per_token(cfg: ModelConfig, s: int, vocab: Optional[int] = None) -> float:
    """The planner's own count (must equal monitoring.flops.model_flops_per_token)."""
    D = cfg.num_nextn_predict_layers
    total = sum(layer_flops(cfg, s, i) for i in range(cfg.num_hidden_layers)) + mtp_layer_flops(cfg, s)
    return total + (D + 1) * head_flops(cfg, vocab)


def recompute_flops(cfg: ModelConfig, s: int, layer_idx: int, recompute: str, mtp_block: bool = False) -> float:
    """Extra forward FLOPs per token that recomputation re-runs for one layer (selective: the planner's set,
    memory.selective_modules(cfg))."""
    a = attention_macs(cfg, s, layer_idx, mtp_block)
    if recompute == "full":
        idx = a.get("indexer_proj", 0.0) + a.get("indexer_scores", 0.0)
        return FMA * (a["proj"] + a["core"] + idx + ffn_macs(cfg, layer_idx, mtp_block))
    if recompute == "selective":  # mla_up_proj, V4 mhc (+ norms and the SwiGLU product: elementwise, not counted)
        return FMA * (a.get("up_proj", 0.0) + a.get("mhc_coeff", 0.0))
    return 0.0


def stage_flops_per_token(cfg: ModelConfig, s: int, split: StageSplit, p: int, recompute: str,
                          vocab: Optional[int] = None) -> float:
    """FLOPs per micro-batch token the whole stage p executes (all TP ranks together)."""
    f = 0.0
    for i in split.rank_layers(p):
        f += layer_flops(cfg, s, i) + recompute_flops(cfg, s, i, recompute)
    if split.is_last(p):
        f += mtp_layer_flops(cfg, s, recompute) + (cfg.num_nextn_predict_layers + 1) * head_flops(cfg, vocab)
    return f


@dataclass(frozen=True)
class TimeOptions:
    efficiency: float = 0.5  # achieved fraction of peak FLOP/s in compute kernels
    overlap_tp: float = 0.0
    overlap_ep: float = 0.0  # 1F1B: a2a on the critical path; DualPipe-style overlap -> 1.0
    overlap_pp: float = 0.0
    overlap_dp: bool = True  # grad reduce overlapped with the last backward, param gather with next forward
    optimizer_bytes_per_param: float = 32.0  # Adam: read grad/main/m/v, write main/m/v/param
    dispatch_bytes: Optional[float] = None  # bytes per element of the forward dispatch (1 = FP8, DeepSeek-V3)
    ep_node_limit: Optional[int] = None  # node-limited routing + per-node dedup (DeepSeek-V3: 4)


@dataclass
class StepTime:
    step_s: float
    compute_s: float  # pipeline compute incl. bubble
    bubble_fraction: float
    exposed: Dict[str, float] = field(default_factory=dict)  # seconds per group on the critical path
    comm_total: Dict[str, float] = field(default_factory=dict)  # seconds per group if nothing overlapped
    optimizer_s: float = 0.0
    slowest_stage: int = 0
    tokens_per_s_per_device: float = 0.0
    model_tflops_per_device: float = 0.0


def _moe_layers(cfg: ModelConfig, split: StageSplit, p: int) -> int:
    n = sum(1 for i in split.rank_layers(p) if cfg.model_type == "deepseek_v4" or cfg.is_moe_layer(i))
    if split.is_last(p) and cfg.num_nextn_predict_layers and (
            cfg.model_type == "deepseek_v4" or cfg.is_moe_layer(cfg.num_hidden_layers - 1)):
        n += cfg.num_nextn_predict_layers
    return n


def step_time(cfg: ModelConfig, layout: Layout, split: StageSplit, counts: List[ParamCount], cluster: Cluster,
              seq_length: int, global_batch_size: int, opts: TimeOptions, act_bytes: int = 2,
              grad_bytes: int = 4, param_bytes: int = 2) -> StepTime:
    m = global_batch_size // (layout.micro_batch_size * layout.dp)
    T = seq_length * layout.micro_batch_size
    co = CommOptions(seq_length=seq_length, num_microbatches=m, act_bytes=act_bytes, grad_bytes=grad_bytes,
                     param_bytes=param_bytes)
    vocab = padded_vocab(cfg, layout.tp)
    peak = cluster.tflops * 1e12 * opts.efficiency
    per_stage = []
    comm_total: Dict[str, float] = {}
    exposed_stage = []
    for p in range(layout.pp):
        vol = rank_step_volume(cfg, layout, split, p, counts[p], co)
        secs: Dict[str, float] = {}
        for (g, op), b in vol.items():
            if g != "ep":
                secs[g] = secs.get(g, 0.0) + collective_seconds(g, op, b, layout, cluster)
        moe = _moe_layers(cfg, split, p)
        secs["ep"] = ep_seconds(cfg, layout, cluster, T / layout.tp, moe, m, act_bytes, opts.dispatch_bytes,
                                opts.ep_node_limit)
        comp = stage_flops_per_token(cfg, seq_length, split, p, layout.recompute, vocab) * T / layout.tp / peak
        mb_comm = ((1 - opts.overlap_tp) * secs.get("tp", 0.0) + (1 - opts.overlap_ep) * secs.get("ep", 0.0)
                   + (1 - opts.overlap_pp) * secs.get("pp", 0.0)) / m
        per_stage.append(comp + mb_comm)
        exposed_stage.append((secs, comp))
        for g, sec in secs.items():
            comm_total[g] = max(comm_total.get(g, 0.0), sec)
    vp = layout.vp
    if layout.schedule == "dualpipe":
        # each rank runs stage p and its mirror pp-1-p, half the micro-batches each; a2a hidden in the
        # overlapped forward&backward chunk; bubble (pp/2 - 1)(F&B + B - 3W) with F = 1/3, B = 2/3, W = 1/3
        pp = layout.pp
        exposed_stage = [({**exposed_stage[p][0], "ep": 0.0},
                          (exposed_stage[p][1] + exposed_stage[pp - 1 - p][1]) / 2) for p in range(pp)]
        per_stage = [comp_p + ((1 - opts.overlap_tp) * secs_p.get("tp", 0.0)
                               + (1 - opts.overlap_pp) * secs_p.get("pp", 0.0)) / m
                     for secs_p, comp_p in exposed_stage]
        slow = max(range(pp), key=lambda p: per_stage[p])
        t_mb = per_stage[slow]
        bubble_units = (pp / 2 - 1) * (2.0 / 3.0)
        t_pipe = (m + bubble_units) * t_mb
        bubble = bubble_units / (m + bubble_units)
    elif layout.schedule == "dualpipev":
        # rank p runs stages p and 2pp-1-p for every micro-batch (per_stage holds both); one chunk's forward
        # overlaps another's backward, hiding the all-to-all (MindSpeed --moe-fb-overlap); DualPipe's bubble
        # (S/2 - 1)(F&B + B - 3W) with S = 2 pp stages of half a rank's time each, F = 1/3, B = 2/3, W = 1/3
        exposed_stage = [({**secs_p, "ep": 0.0}, comp_p) for secs_p, comp_p in exposed_stage]
        per_stage = [comp_p + ((1 - opts.overlap_tp) * secs_p.get("tp", 0.0)
                               + (1 - opts.overlap_pp) * secs_p.get("pp", 0.0)) / m
                     for secs_p, comp_p in exposed_stage]
        slow = max(range(layout.pp), key=lambda p: per_stage[p])
        t_mb = per_stage[slow]
        bubble_units = (layout.pp - 1) * (2.0 / 3.0) / 2.0
        t_pipe = (m + bubble_units) * t_mb
        bubble = bubble_units / (m + bubble_units)
    else:
        slow = max(range(layout.pp), key=lambda p: per_stage[p])
        t_mb = per_stage[slow]
        t_pipe = (m + (layout.pp - 1) / vp) * t_mb
        bubble = (layout.pp - 1) / (vp * m + layout.pp - 1)
    secs, comp = exposed_stage[slow]
    dp_like = max(exposed_stage[p][0].get("dp_cp", 0.0) + exposed_stage[p][0].get("edp", 0.0)
                  for p in range(layout.pp))
    if opts.overlap_dp:
        # reduce-scatter/all-reduce of grads hides behind the last backward, the param gather behind the next forward
        dp_exposed = max(0.0, dp_like - t_mb)
    else:
        dp_exposed = dp_like
    emb = max(exposed_stage[p][0].get("embedding", 0.0) for p in range(layout.pp))
    owned = max((c.dense / layout.dp + c.expert / layout.edp) if layout.distributed_optimizer else c.total
                for c in counts)
    t_opt = owned * opts.optimizer_bytes_per_param / (cluster.hbm_tbps * 1e12)
    t_step = t_pipe + dp_exposed + emb + t_opt
    exposed = {"tp": (1 - opts.overlap_tp) * secs.get("tp", 0.0), "ep": (1 - opts.overlap_ep) * secs.get("ep", 0.0),
               "pp": (1 - opts.overlap_pp) * secs.get("pp", 0.0), "dp": dp_exposed, "embedding": emb}
    tokens = global_batch_size * seq_length
    tps = tokens / t_step / cluster.num_devices
    mf = model_flops_per_token(cfg, seq_length, vocab)
    return StepTime(step_s=t_step, compute_s=t_pipe / t_mb * comp if t_mb else 0.0, bubble_fraction=bubble,
                    exposed=exposed, comm_total=comm_total, optimizer_s=t_opt, slowest_stage=slow,
                    tokens_per_s_per_device=tps, model_tflops_per_device=tps * mf / 1e12)
