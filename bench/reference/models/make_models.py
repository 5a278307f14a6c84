#!/usr/bin/env python
"""Write the reference recipes' model configs (config.json files in this directory) from one table.

    python bench/reference/models/make_models.py          # rewrite every *.json here
    python bench/reference/models/make_models.py --check  # exit 1 if a file differs from the table

Full models carry the published config.json values (docs: /work/shared/reference/deepseek_architecture.md §4.1,
§6.1; V3 with plain RoPE at 4K as in its pre-training). A *proxy* is its full model with fewer decoder layers and
every layer shape unchanged (hidden size, heads, MLA ranks, experts and their widths, router, MTP); for V4 the
per-layer compress ratios are the full model's first layers plus its MTP entry. tests/test_reference_recipes.py
checks that the files equal this table and that every proxy equals its full model but for the layer count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))

V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
    topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
    first_k_dense_replace=1, moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=163840, tie_word_embeddings=False, num_nextn_predict_layers=0,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                      mscale=0.707, mscale_all_dim=0.707),
    init_method_std=0.006, bos_token_id=100000, eos_token_id=100001)

V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    first_k_dense_replace=3, moe_layer_freq=1, aux_loss_alpha=0.0001, seq_aux=True, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False, num_nextn_predict_layers=1,
    init_method_std=0.006, bos_token_id=0, eos_token_id=1)


def _v4(hidden, layers, heads, q_lora, o_groups, ratios, topk, experts, moe_inter, scale) -> dict:
    return dict(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=129280, hidden_size=hidden,
        intermediate_size=moe_inter, moe_intermediate_size=moe_inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=512, q_lora_rank=q_lora, kv_lora_rank=512,
        qk_nope_head_dim=448, qk_rope_head_dim=64, v_head_dim=512, o_groups=o_groups, o_lora_rank=1024,
        sliding_window=128, compress_ratios=ratios, compress_rope_theta=160000.0, index_n_heads=64,
        index_head_dim=128, index_topk=topk, n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=6,
        n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sqrtsoftplus", norm_topk_prob=True,
        routed_scaling_factor=scale, first_k_dense_replace=0, moe_layer_freq=1, num_hash_layers=3,
        swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0),
        max_position_embeddings=1048576, tie_word_embeddings=False, num_nextn_predict_layers=1,
        aux_loss_alpha=0.0001, init_method_std=0.006, bos_token_id=0, eos_token_id=1)


V4_FLASH = _v4(4096, 43, 64, 1024, 8, [0, 0] + [4, 128] * 20 + [4] + [0], 512, 256, 2048, 1.5)
V4_PRO = _v4(7168, 61, 128, 1536, 16, [128, 128] + [4, 128] * 29 + [4] + [0], 1024, 384, 3072, 2.5)

CPU_TINY = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=512, hidden_size=64,
    intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, topk_method="noaux_tc",
    scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
    moe_layer_freq=1, aux_loss_alpha=0.0001, seq_aux=True, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=False, num_nextn_predict_layers=1,
    mtp_loss_scaling_factor=0.3, init_method_std=0.02, bos_token_id=0, eos_token_id=1)

CPU_TINY_V4 = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=512, hidden_size=64,
    intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
    head_dim=32, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
    o_groups=2, o_lora_rank=16, sliding_window=16, compress_ratios=[0, 4, 16, 4, 0], compress_rope_theta=40000.0,
    index_n_heads=2, index_head_dim=32, index_topk=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sqrtsoftplus", norm_topk_prob=True,
    routed_scaling_factor=1.5, first_k_dense_replace=0, moe_layer_freq=1, num_hash_layers=1, swiglu_limit=10.0,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=0.0),
    max_position_embeddings=256, tie_word_embeddings=False, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3,
    aux_loss_alpha=0.0001, init_method_std=0.02, bos_token_id=0, eos_token_id=1)


def proxy(full: dict, layers: int, dense: int = None) -> dict:
    """``full`` with ``layers`` decoder layers (``dense`` of them dense-FFN, default: the full model's count)."""
    d = json.loads(json.dumps(full))
    d["num_hidden_layers"] = layers
    if dense is not None:
        d["first_k_dense_replace"] = dense
    if "compress_ratios" in d:  # the first `layers` layers' ratios, then the MTP layer's
        r = full["compress_ratios"]
        d["compress_ratios"] = r[:layers] + r[full["num_hidden_layers"]:]
    return d


MODELS: Dict[str, dict] = {
    "cpu-tiny": CPU_TINY,
    "cpu-tiny-v4": CPU_TINY_V4,
    "v2-lite": V2_LITE,
    "v3": V3,
    "v3-proxy-8": proxy(V3, 3, dense=1),
    "v3-proxy-64": proxy(V3, 16),
    "v4-flash": V4_FLASH,
    "v4-flash-proxy-64": proxy(V4_FLASH, 12),
    "v4-pro": V4_PRO,
    "v4-pro-proxy-64": proxy(V4_PRO, 6),
}
FULL_OF = {"v3-proxy-8": "v3", "v3-proxy-64": "v3", "v4-flash-proxy-64": "v4-flash", "v4-pro-proxy-64": "v4-pro"}


def text(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/reference/models/make_models.py", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    a = p.parse_args(argv)
    bad = 0
    for name, d in MODELS.items():
        path = os.path.join(HERE, f"{name}.json")
        if a.check:
            try:
                same = open(path).read() == text(d)
            except OSError:
                same = False
            if not same:
                print(f"{path} differs from make_models.py's table; run make_models.py")
                bad += 1
        else:
            with open(path, "w") as f:
                f.write(text(d))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
