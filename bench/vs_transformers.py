#!/usr/bin/env python
"""Side by side: one training step (forward + backward + AdamW) of our DeepseekForCausalLM vs transformers'
DeepseekV3ForCausalLM on the same DeepSeek-V3 config, the same weights and the same thread count, in one process.

    python bench/vs_transformers.py [--configs small,large] [--reps 8] [--threads 2]

First the two losses on the same batch must agree (|dloss| <= 1e-5, fp32), otherwise the timing compares
different models. Then the steps are interleaved (ours, theirs, ours, ...), 2 warm-up repetitions discarded,
and the median and IQR of tokens/s are printed with the ratio ours / transformers. Both sides use
torch.optim.AdamW (foreach) and torch's SDPA attention. Targets (issue 11): >= 1.5x small, >= 1.2x large.
Not a test: CPU timings on a shared machine are noisy; read the IQR.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CONFIGS = {
    # hidden 256-512, 16+ routed experts, seq 256+ (the "small")
    "small": dict(model=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
                             num_key_value_heads=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                             n_group=4, topk_group=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024),
                  seq=256, mbs=2),
    "large": dict(model=dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
                             num_key_value_heads=16, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
                             n_group=4, topk_group=2, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                             qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=1024),
                  seq=512, mbs=1),
}


def build(name):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from megatron_ascend.models.deepseek import DeepseekForCausalLM, load_hf_state_dict_into
    from megatron_ascend.models.deepseek.hf import model_config_for_hf
    spec = CONFIGS[name]
    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(**spec["model"], num_nextn_predict_layers=0, attn_implementation="sdpa")
    hf = DeepseekV3ForCausalLM(hf_cfg).float()
    cfg = model_config_for_hf(hf_cfg, aux_loss_alpha=0.0, num_nextn_predict_layers=0)
    ours = DeepseekForCausalLM(cfg)
    missing, unused = load_hf_state_dict_into(ours, hf.state_dict())
    if missing or unused:
        raise RuntimeError(f"weight transfer incomplete: missing {missing[:5]}, unused {unused[:5]}")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (spec["mbs"], spec["seq"]), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (spec["mbs"], spec["seq"]), generator=g)
    return cfg, ours, hf, ids, labels


def loss_ours(model, ids, labels):
    mask = torch.ones(labels.shape)
    out = model(ids, labels=labels, loss_mask=mask)
    return (out["lm_loss"] * mask).sum() / mask.sum()


def loss_hf(model, ids, labels):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def step(model, opt, fn, ids, labels):
    opt.zero_grad(set_to_none=True)
    loss = fn(model, ids, labels)
    loss.backward()
    opt.step()
    return loss.item()


def run(name, reps, warmup):
    cfg, ours, hf, ids, labels = build(name)
    with torch.no_grad():
        lo, lh = loss_ours(ours, ids, labels).item(), loss_hf(hf, ids, labels).item()
    print(f"== {name}: h {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}, seq {ids.shape[1]} x mbs {ids.shape[0]}, threads {torch.get_num_threads()}")
    print(f"   loss ours {lo:.7f}  transformers {lh:.7f}  |d| {abs(lo - lh):.2e}")
    if abs(lo - lh) > 1e-5:
        raise SystemExit(f"losses differ by {abs(lo - lh):.2e} > 1e-5: not the same model, no timing")
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
            "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)}
    models = {"ours": (ours, loss_ours), "transformers": (hf, loss_hf)}
    times = {k: [] for k in models}
    for r in range(reps + warmup):
        for k in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            m, fn = models[k]
            t0 = time.perf_counter()
            step(m, opts[k], fn, ids, labels)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    tokens = ids.numel()
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = tokens / statistics.median(ts)
        print(f"   {k:<13} {out[k]:9.0f} tok/s  (median step {statistics.median(ts) * 1e3:7.1f} ms, "
              f"IQR {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} ms, n={len(ts)})")
    ratio = out["ours"] / out["transformers"]
    print(f"   ratio ours / transformers = {ratio:.2f}x")
    return ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="small,large")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name in a.configs.split(","):
        run(name, a.reps, a.warmup)


if __name__ == "__main__":
    main()
