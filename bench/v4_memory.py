#!/usr/bin/env python
"""DeepSeek-V4 activation memory measured against the planner (planner/memory.py + memory_v4.py).

    python bench/v4_memory.py [--seq 512 2048] [--hidden 512] [--precision fp32 bf16] [--threads 2]

One process, a small V4-shaped model built by models/deepseek_v4 (layers: sliding, CSA with its indexer and
the indexer loss, HCA, CSA, HCA; the first layer hash-routed; one MTP depth), forward only: the bytes autograd
saves for backward are what recompute.SavedTensorMeter records (parameters and their views excluded, storages
counted once), per decoder layer, for the MTP depth and for the whole forward. For each sequence length,
precision (bf16 as the trainer casts it: mHC parameters, V4 norms and routers kept fp32) and recompute setting
(none, the planner's selective set for V4, `mhc` alone, full uniform 1 layer) it prints measured MiB, the
planner's MiB and measured / planner. tests/test_planner_v4.py asserts the same comparison at a tiny size
(within 10 %); this prints it at sizes where the window, the compressed entries and the top-k are in the
regime of the real models (sequence >> window, CSA entries >> index_topk). Not a test.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
MIB = float(1 << 20)


def v4_config(hidden: int, max_seq: int):
    from megatron_ascend.config import ModelConfig
    heads = max(4, hidden // 64)
    d = dict(model_type="deepseek_v4", vocab_size=4096, hidden_size=hidden, moe_intermediate_size=hidden // 2,
             num_hidden_layers=5, num_attention_heads=heads, head_dim=64, partial_rotary_factor=0.5,
             q_lora_rank=hidden // 2, o_groups=4, o_lora_rank=hidden // 4, n_routed_experts=16, n_shared_experts=1,
             num_experts_per_tok=4, routed_scaling_factor=1.5, index_n_heads=4, index_head_dim=64, index_topk=64,
             sliding_window=128, layer_types=[SLIDING, CSA, HCA, CSA, HCA], compress_rates={CSA: 4, HCA: 128},
             mlp_layer_types=["hash_moe", "moe", "moe", "moe", "moe"], swiglu_limit=7.0,
             max_position_embeddings=max_seq, rope_theta=10000.0, compress_rope_theta=160000.0,
             hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
             tie_word_embeddings=False, dsa_indexer_loss_coeff=0.1)
    return ModelConfig.from_hf_dict(d)


def settings():
    from megatron_ascend.planner import memory
    mods = memory.SELECTIVE_MODULES_V4
    return {  # name: (apply_recompute kwargs, planner recompute, planner selective modules)
        "none": (None, "none", ()),
        "selective": (dict(granularity="selective", modules=mods), "selective", mods),
        "mhc": (dict(granularity="selective", modules=("mhc",)), "selective", ("mhc",)),
        "full": (dict(granularity="full", method="uniform", num_layers=1), "full", ()),
    }


def measure(cfg, seq: int, batch: int, precision: str, setting: str):
    """{scope: (measured bytes, planner bytes)} for the decoder layers, the MTP depth (not under full recompute:
    there the checkpoint scope holds the layers' inputs) and the whole forward."""
    from megatron_ascend.models import build_model
    from megatron_ascend.planner import memory, memory_v4
    from megatron_ascend.recompute import SavedTensorMeter, apply_recompute
    from megatron_ascend.training.parts import _cast_keep_fp32_buffers
    kw, mode, mods = settings()[setting]
    model = build_model(cfg, init_seed=5)
    act_bytes = 4
    if precision == "bf16":
        _cast_keep_fp32_buffers(model, torch.bfloat16)
        act_bytes = 2
    if kw:
        apply_recompute(model, **kw)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", enabled=False), SavedTensorMeter(model) as meter:
        model(ids, labels=ids, loss_mask=torch.ones(batch, seq))
    o = memory.ActivationOptions(seq_length=seq, micro_batch_size=batch, act_bytes=act_bytes, recompute=mode,
                                 selective_modules=mods)
    est = memory_v4.forward_estimate(cfg, o)
    got = dict(meter.per_scope)
    out = {}
    if mode == "full":
        out["checkpoint (every layer's inputs)"] = (got["checkpoint"], est["checkpoint"])
    else:
        for i in range(cfg.num_hidden_layers):
            out[f"layer.{i} {cfg.attention_type(i).split('_')[0]}"] = (got[f"layer.{i}"], est[f"layer.{i}"])
        out["mtp.0"] = (got["mtp.0"], est["mtp.0"])
    out["whole forward"] = (meter.total_bytes, est["total"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="sequence lengths (default 512 2048)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512; heads = hidden / 64)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--recompute", nargs="+", default=["none", "selective", "mhc", "full"],
                   choices=["none", "selective", "mhc", "full"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = v4_config(a.hidden, max(a.seq))
    print(f"DeepSeek-V4-shaped model: hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, "
          f"hc_mult {cfg.hc_mult}, window {cfg.sliding_window}, CSA ratio 4 (top-{cfg.index_topk}), HCA ratio 128, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, 1 MTP depth; forward only, batch {a.batch}")
    print(f"{'seq':>6} {'prec':>5} {'recompute':>10}  {'scope':<34} {'measured MiB':>13} {'planner MiB':>12} "
          f"{'measured/planner':>17}")
    ratios = []
    for seq in a.seq:
        for prec in a.precision:
            for rc in a.recompute:
                for scope, (m, e) in measure(cfg, seq, a.batch, prec, rc).items():
                    ratios.append(m / e)
                    print(f"{seq:>6} {prec:>5} {rc:>10}  {scope:<34} {m / MIB:>13.2f} {e / MIB:>12.2f} "
                          f"{m / e:>17.3f}")
    print(f"measured / planner over {len(ratios)} rows: min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
