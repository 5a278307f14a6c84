#!/usr/bin/env python
"""Step time and activation memory as sequence length, experts, layers and micro-batch grow, against FLOPs and
the planner's activation estimate (single process, fp32, forward + backward + AdamW).

    python bench/scaling.py [--reps 3] [--threads 2]

For each sweep the first point is the base; every row prints step time / base, FLOPs / base (their ratio is
the time per FLOP relative to the base: 1.00 = scales like the FLOPs), the saved-tensor bytes measured by
recompute.SavedTensorMeter (parameter views filtered) and measured / planner estimate. Not a test.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ascend.config import ModelConfig  # noqa: E402

BASE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=8, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, max_position_embeddings=4096, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
SWEEPS = {
    "seq": [dict(seq=s) for s in (128, 256, 512, 1024)],
    "experts": [dict(n_routed_experts=e) for e in (8, 16, 32, 64)],
    "layers": [dict(num_hidden_layers=n) for n in (2, 4, 8)],
    "micro_batch": [dict(mbs=b) for b in (1, 2, 4)],
}


def measure(over, reps):
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.monitoring.flops import model_flops_per_token
    from megatron_ascend.planner.memory import (ActivationOptions, embedding_activation_bytes,
                                                head_activation_bytes, layer_activation_bytes)
    from megatron_ascend.recompute import SavedTensorMeter
    over = dict(over)
    seq, mbs = over.pop("seq", 256), over.pop("mbs", 1)
    cfg = ModelConfig(**{**BASE, **over})
    torch.manual_seed(0)
    m = DeepseekForCausalLM(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq))
    mask = torch.ones(mbs, seq)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    class Meter(SavedTensorMeter):
        def record(self, t, kept_by_checkpoint=False):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in params:
                return
            super().record(t, kept_by_checkpoint)

    def step(meter=None):
        opt.zero_grad(set_to_none=True)
        if meter is not None:
            with meter:
                out = m(ids, labels=ids, loss_mask=mask)
        else:
            out = m(ids, labels=ids, loss_mask=mask)
        ((out["lm_loss"] * mask).sum() / mask.sum()).backward()
        opt.step()

    meter = Meter(m)
    step(meter)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    o = ActivationOptions(seq_length=seq, micro_batch_size=mbs, act_bytes=4,
                          flash_attention=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim == cfg.v_head_dim)
    est = sum(layer_activation_bytes(cfg, i, o) for i in range(cfg.num_hidden_layers))
    est += head_activation_bytes(cfg, o, cfg.vocab_size, 0) + embedding_activation_bytes(o, cfg)
    return statistics.median(ts), model_flops_per_token(cfg, seq) * seq * mbs, meter.total_bytes, est


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweeps", default=",".join(SWEEPS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.sweeps.split(","):
        print(f"== {name}")
        base = None
        for over in SWEEPS[name]:
            t, f, saved, est = measure(over, a.reps)
            base = base or (t, f)
            print(f"  {str(over):<28} step {t * 1e3:8.1f} ms  time x{t / base[0]:5.2f}  FLOPs x{f / base[1]:5.2f}  "
                  f"time/FLOP x{(t / base[0]) / (f / base[1]):4.2f}  saved {saved / 2**20:7.1f} MiB  "
                  f"measured/planner {saved / est:4.2f}")


if __name__ == "__main__":
    main()
