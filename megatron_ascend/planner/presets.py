"""Named planning questions: model + cluster + batch + assumptions (tools/plan.py --preset NAME).

* ``v3-2048-h800``: DeepSeek-V3 671B pretraining on 2,048 H800 (every device figure from platform.devices),
  seq 4096, global batch 15,360 sequences (the report's final batch), AdamW moments in BF16 as in the report.
  DeepSeek's own layout: TP1 PP16 EP64 DP128 + ZeRO-1.
* ``v4pro-1024-910c``: full-parameter post-training of DeepSeek-V4-Pro (§6.1 numbers) on 1,024 Ascend 910C
  logical devices (one die each, platform.devices' Ascend910C entry), seq 8192, global batch 512. V4 attention
  is not in the library: its parameters and FLOPs come from the §6 formulas.

The cluster of a preset is ``Cluster.from_device``: the same table ``plan.py --device`` reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from ..config import ModelConfig, RopeScaling
from .layout import Cluster, Layout
from .step_time import TimeOptions


# DeepSeek-V3 technical report (arXiv 2412.19437) §1 / Table 1: 14.8T pre-training tokens, 2,664K H800 GPU-hours
V3_REPORT_TOKENS = 14.8e12
V3_REPORT_GPU_HOURS = 2.664e6


def deepseek_v3() -> ModelConfig:
    """The released V3 config.json (§4.1) with its one MTP layer; plain RoPE as in 4K pre-training."""
    return ModelConfig(model_type="deepseek_v3", num_nextn_predict_layers=1, n_group=8, topk_group=4,
                       max_position_embeddings=4096)


def deepseek_v4_pro() -> ModelConfig:
    """DeepSeek-V4-Pro from §6.1 (transformers' DeepseekV4Config defaults overridden with the Pro numbers)."""
    ratios = (128, 128) + (4, 128) * 29 + (4,)
    return ModelConfig(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=7168, intermediate_size=3072,
        moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=448, qk_rope_head_dim=64, v_head_dim=512, head_dim=512,
        n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="noaux_tc", scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=0, num_nextn_predict_layers=1, rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=65536),
        max_position_embeddings=1048576, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, sliding_window=128,
        compress_ratios=ratios, o_groups=16, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
        index_topk=1024, num_hash_layers=3, swiglu_limit=10.0)


@dataclass(frozen=True)
class Preset:
    name: str
    question: str
    model: ModelConfig
    cluster: Cluster
    seq_length: int
    global_batch_size: int
    precision: str = "bf16"
    time: TimeOptions = TimeOptions()
    reference_layouts: Dict[str, Layout] = field(default_factory=dict)
    reference_tokens_per_s: Optional[float] = None
    # assumptions for reference layouts run with schedule="dualpipe" (DeepSeek-V3's own system)
    dualpipe_time: TimeOptions = TimeOptions(dispatch_bytes=1, ep_node_limit=4)


def preset(name: str) -> Preset:
    if name == "v3-2048-h800":
        cl = Cluster.from_device("H800", 2048)
        base = Layout(tp=1, pp=16, ep=64, dp=128, distributed_optimizer=True, recompute="full",
                      first_stage_layers=4, last_stage_layers=1)
        return Preset(
            name, "Which layouts fit DeepSeek-V3 671B pretraining on 2,048 H800 80 GB?", deepseek_v3(), cl,
            4096, 15360, precision="bf16-bf16moments",
            reference_layouts={
                "DeepSeek PP16/EP64/ZeRO-1, our 1F1B, full recompute": base,
                "DeepSeek PP16/EP64/ZeRO-1, our 1F1B, selective recompute": base.replace(recompute="selective"),
                "DeepSeek PP16/EP64/ZeRO-1 as the report runs it (DualPipe, FP8 dispatch, node-limited 4), "
                "full recompute": base.replace(schedule="dualpipe"),
                "same, selective recompute": base.replace(schedule="dualpipe", recompute="selective"),
            },
            reference_tokens_per_s=V3_REPORT_TOKENS / V3_REPORT_GPU_HOURS / 3600)
    if name == "v4pro-1024-910c":
        cl = Cluster.from_device("Ascend910C", 1024)
        return Preset(name, "Which layouts fit full-parameter post-training of DeepSeek-V4-Pro on 1,024 Ascend "
                            "910C devices (64 GB each)?", deepseek_v4_pro(), cl, 8192, 512,
                      reference_layouts={
                          "MindSpeed-style TP2 PP8 EP32-like scaled: TP2 PP16 EP64, distopt, full recompute":
                              Layout(tp=2, pp=16, ep=64, etp=1, dp=32, sp=True, distributed_optimizer=True,
                                     recompute="full", first_stage_layers=4, last_stage_layers=1),
                          "MindSpeed's V3 A3 recipe shape: TP2 PP8 EP32, DualPipeV + fb-overlap (16 stages of "
                          "4 layers, the last 1), distopt, full recompute":
                              Layout(tp=2, pp=8, ep=32, etp=1, dp=64, sp=True, distributed_optimizer=True,
                                     recompute="full", schedule="dualpipev", layer_counts=(4,) * 15 + (1,))})
    raise ValueError(f"preset {name!r} is unknown; use v3-2048-h800 or v4pro-1024-910c")


PRESETS = ("v3-2048-h800", "v4pro-1024-910c")
