"""Activation bytes saved for backward and step time for each recompute setting, as ratios to no recompute.

    python bench/recompute.py [--layers 4] [--seq 256] [--batch 2] [--hidden 256] [--repeats 3]

One process, a small DeepSeek-V3-shaped model (1 dense + MoE layers, MLA, MTP). Bytes come from
``recompute.SavedTensorMeter`` (saved-tensor hooks, parameters and their views excluded, storages
deduplicated; "layers" counts decoder/MTP layers and recompute checkpoints, "total" adds the head and loss).
Step time is the median of ``--repeats`` forward+backward passes. This is a benchmark that prints numbers, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ascend import platform  # noqa: E402
from megatron_ascend.config import ModelConfig  # noqa: E402
from megatron_ascend.models.deepseek import DeepseekForCausalLM  # noqa: E402
from megatron_ascend.recompute import SavedTensorMeter, apply_recompute  # noqa: E402


def build(args) -> DeepseekForCausalLM:
    h = args.hidden
    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=args.vocab, hidden_size=h, intermediate_size=2 * h,
                      moe_intermediate_size=h // 2, num_hidden_layers=args.layers, num_attention_heads=8,
                      q_lora_rank=h // 4, kv_lora_rank=h // 4, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                      topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
                      max_position_embeddings=max(4096, args.seq))
    return DeepseekForCausalLM(cfg, init_seed=1).to(platform.get_platform().device())


def step(model, ids, labels, setting, meter=None):
    apply_recompute(model, **setting)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    ctx = meter if meter is not None else torch.enable_grad()
    with ctx:
        out = model(ids, labels=labels)
        loss = out["lm_loss"].mean() + out["mtp_loss_scale"] * sum(l.mean() for l in out["mtp_losses"])
    loss.backward()
    platform.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args)
    dev = platform.get_platform().device()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    settings = [("none", dict(granularity=None))]
    for m in ("core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "moe_act", "shared_experts"):
        settings.append((f"selective {m}", dict(granularity="selective", modules=(m,))))
    settings += [("full uniform 1", dict(granularity="full", method="uniform", num_layers=1)),
                 ("full uniform 2", dict(granularity="full", method="uniform", num_layers=2)),
                 ("full block 2", dict(granularity="full", method="block", num_layers=2))]
    print(f"# {platform.get_platform().kind}: layers {args.layers} hidden {args.hidden} seq {args.seq} "
          f"batch {args.batch} vocab {args.vocab}, torch threads {torch.get_num_threads()}")
    base = None
    print(f"{'setting':<24}{'total MiB':>10}{'total':>8}{'layers':>8}{'step s':>9}{'time':>7}{'dev MiB':>9}")
    for name, s in settings:
        step(model, ids, labels, s)  # warm-up
        meter = SavedTensorMeter(model)
        step(model, ids, labels, s, meter)
        times = [step(model, ids, labels, s) for _ in range(args.repeats)]
        t = statistics.median(times)
        row = (meter.total_bytes, meter.layer_bytes, t)
        if base is None:
            base = row
        dev_mib = meter.device_delta_bytes / 2 ** 20 if platform.get_platform().kind != "cpu" else float("nan")
        print(f"{name:<24}{row[0] / 2 ** 20:>10.2f}{row[0] / base[0]:>8.3f}{row[1] / base[1]:>8.3f}"
              f"{t:>9.3f}{t / base[2]:>7.2f}{dev_mib:>9.2f}")


if __name__ == "__main__":
    main()
