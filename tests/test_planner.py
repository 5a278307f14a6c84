"""Planner: exact parameter counts (vs transformers and our model), FLOPs (vs monitoring.flops), model-state
formulas (vs optimizer.memory's table), pipeline bubble, and the two preset questions."""
import pytest
import torch

from megatron_ascend.config import ModelConfig
from megatron_ascend.planner import presets
from megatron_ascend.planner.enumerate import evaluate, search
from megatron_ascend.planner.layout import Cluster, Layout
from megatron_ascend.planner.memory import GIB, Precision, model_state_bytes
from megatron_ascend.planner.params import active_params, rank_params, stage_split, total_params
from megatron_ascend.planner import step_time as st

V3_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
               n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1)


def _hf_count(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts_equal_transformers_tiny():
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              DeepseekV4Config, DeepseekV4ForCausalLM)
    c3 = DeepseekV3Config(**V3_TINY)
    assert total_params(ModelConfig.from_hf_dict(c3.to_dict()), include_mtp=False) == \
        _hf_count(DeepseekV3ForCausalLM(c3)) == 207952
    c2 = DeepseekV2Config(**{**V3_TINY, "q_lora_rank": None, "n_shared_experts": 2, "topk_method": "greedy",
                             "n_group": 1, "topk_group": 1})
    assert total_params(ModelConfig.from_hf_dict(c2.to_dict()), include_mtp=False) == _hf_count(DeepseekV2ForCausalLM(c2))
    c4 = DeepseekV4Config(vocab_size=97, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, n_routed_experts=8,
                          num_experts_per_tok=2, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16,
                          index_topk=4, sliding_window=8,
                          layer_types=["sliding_attention", "compressed_sparse_attention",
                                       "heavily_compressed_attention", "compressed_sparse_attention"],
                          mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"])
    assert total_params(ModelConfig.from_hf_dict(c4.to_dict()), include_mtp=False) == _hf_count(DeepseekV4ForCausalLM(c4))


def test_headline_counts_and_v4pro_preset():
    v3 = presets.deepseek_v3()
    assert total_params(v3, include_mtp=False) == 671_026_404_352  # deepseek_architecture.md §0: 671.03B
    assert round(active_params(v3) / 1e9, 2) == 37.55
    pro = presets.deepseek_v4_pro()
    assert round(total_params(pro, include_mtp=False) / 1e9, 1) == 1573.0  # §0: 1573.0B / 49.78B
    assert round(active_params(pro) / 1e9, 2) == 49.78
    # the preset equals transformers' DeepseekV4Config defaults overridden with the Pro numbers (§6.1)
    from transformers import DeepseekV4Config
    kinds = {4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    hf = DeepseekV4Config(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                          o_groups=16, o_lora_rank=1024, index_topk=1024, n_routed_experts=384,
                          moe_intermediate_size=3072, routed_scaling_factor=2.5,
                          layer_types=[kinds[r] for r in pro.compress_ratios],
                          mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58)
    from_hf = ModelConfig.from_hf_dict(hf.to_dict())
    assert total_params(from_hf) == total_params(pro)
    assert st.model_flops_per_token(from_hf, 8192) == st.model_flops_per_token(pro, 8192)


def test_param_count_equals_our_model_numel():
    from megatron_ascend.models.deepseek.model import DeepseekForCausalLM
    cfg = ModelConfig(**{k: v for k, v in V3_TINY.items() if k != "num_key_value_heads"})
    m = DeepseekForCausalLM(cfg)
    assert sum(p.numel() for p in m.parameters()) == total_params(cfg)
    dense = sum(p.numel() for p in m.parameters() if not getattr(p, "is_expert", False))
    c = rank_params(cfg, stage_split(cfg, 1), 0)
    assert (c.dense, c.expert) == (dense, total_params(cfg) - dense)


@pytest.mark.parametrize("name,seq", [("v3", 4096), ("v3", 1000), ("v2lite", 4096), ("v32", 4096), ("v32", 1024),
                                      ("v4pro", 8192), ("v4pro", 100), ("tiny", 64)])
def test_flops_equal_monitoring(name, seq):
    from megatron_ascend.monitoring.flops import model_flops_per_token
    cfgs = {
        "v3": presets.deepseek_v3(),
        "v2lite": ModelConfig(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                              moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                              q_lora_rank=None, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                              first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy"),
        "v32": ModelConfig(model_type="deepseek_v32", num_nextn_predict_layers=1, index_n_heads=64,
                           index_head_dim=128, index_topk=2048),
        "v4pro": presets.deepseek_v4_pro(),
        "tiny": ModelConfig(**{k: v for k, v in V3_TINY.items() if k != "num_key_value_heads"}),
    }
    cfg = cfgs[name]
    assert st.model_flops_per_token(cfg, seq) == pytest.approx(model_flops_per_token(cfg, seq), rel=1e-12)
    if name == "v3" and seq == 4096:  # performance_reliability_anchors.md §A1: 260.0 GFLOP/token with MTP
        assert round(st.model_flops_per_token(cfg, seq) / 1e9, 1) == 260.0


@pytest.mark.parametrize("bf16,dist,d", [(True, True, 8), (True, False, 8), (False, True, 4), (False, False, 2)])
def test_model_state_formula_matches_optimizer_table(bf16, dist, d):
    from megatron_ascend.optimizer.memory import analytic_model_state_bytes
    cfg = ModelConfig(**{k: v for k, v in V3_TINY.items() if k != "num_key_value_heads"})
    c = rank_params(cfg, stage_split(cfg, 1), 0)
    mine = model_state_bytes(c, Precision.named("bf16" if bf16 else "fp32"), d, d, dist, fp32_params=0).as_dict()
    theirs = analytic_model_state_bytes(c.dense, c.expert, d, d, bf16, dist)
    for k_mine, k_theirs in (("params", "params"), ("grads", "grads"), ("main_params", "main_params"),
                             ("optimizer", "optimizer_states")):
        assert mine[k_mine] == pytest.approx(theirs[k_theirs], abs=1), k_mine
    if bf16 and dist:  # 2 + 4 + 12 / d bytes per parameter
        assert mine["total"] == pytest.approx(c.total * (6 + 12 / d), abs=2)


def test_bubble_and_tokens_per_second_bookkeeping():
    cfg = ModelConfig(**{k: v for k, v in V3_TINY.items() if k != "num_key_value_heads"})
    cl = Cluster.from_device("H800", 8)
    for pp, vp, dp in ((1, 1, 8), (2, 1, 4), (4, 1, 2)):
        lay = Layout(pp=pp, vp=vp, dp=dp, first_stage_layers=None if 3 % pp == 0 else 1,
                     last_stage_layers=None if 3 % pp == 0 else (2 if pp == 2 else 0))
        if pp == 4:
            continue  # 3 layers cannot fill 4 stages with a non-empty middle
        plan = evaluate(cfg, lay, cl, 64, 32)
        m = 32 // dp
        assert plan.num_microbatches == m
        assert plan.time.bubble_fraction == pytest.approx((pp - 1) / (vp * m + pp - 1))
        assert plan.time.tokens_per_s_per_device == pytest.approx(32 * 64 / plan.time.step_s / 8)


def test_v3_preset_deepseek_layout_is_feasible():
    ps = presets.preset("v3-2048-h800")
    prec = Precision.named(ps.precision)
    lays = ps.reference_layouts
    full = evaluate(ps.model, lays["DeepSeek PP16/EP64/ZeRO-1, our 1F1B, full recompute"], ps.cluster,
                    ps.seq_length, ps.global_batch_size, prec, ps.time)
    assert full.feasible and full.peak.total < 80 * GIB
    assert full.layout.tp == 1 and full.layout.dp == 128 and full.layout.edp == 2
    # the same layout without recompute holds 16 in-flight micro-batches of 4 MoE layers: far over 80 GB
    none = evaluate(ps.model, full.layout.replace(recompute="none"), ps.cluster, ps.seq_length,
                    ps.global_batch_size, prec, ps.time)
    assert not none.feasible
    ratio = full.time.tokens_per_s_per_device / ps.reference_tokens_per_s
    assert 0.2 < ratio < 2.0, ratio  # same order as the report's 1,543 tok/s/GPU (see docs/PLANNER.md)
    # model-state bytes of a middle stage, by hand: 4 MoE layers, experts 256/64 per rank, edp 2, dp 128
    p = full.memory[1]
    c = rank_params(ps.model, stage_split(ps.model, 16, 1, 4, 1), 1, 1, 64, 1)
    assert p.params == c.total
    router = c.parts["router"]  # kept in fp32 by the trainer (4 bytes, its own main param)
    by_hand = c.total * 6 + c.dense * 8 / 128 + c.expert * 8 / 2 + router * 2 - router * 4 / 128
    assert p.states.total == pytest.approx(by_hand, abs=4)


def test_v4pro_preset_has_feasible_layouts():
    ps = presets.preset("v4pro-1024-910c")
    plans, n, bad = search(ps.model, ps.cluster, ps.seq_length, ps.global_batch_size, Precision.named(ps.precision),
                           ps.time, tp_sizes=(8, 16), pp_sizes=(8, 16), vp_sizes=(1,), recompute=("full",),
                           micro_batch_sizes=(1,), distributed_optimizer=(True,))
    assert plans and all(p.feasible and p.peak.total <= 64 * GIB for p in plans)
    assert plans == sorted(plans, key=lambda p: -p.time.tokens_per_s_per_device)
