"""MoE benchmark (prints ratios; not a test): grouped-matmul paths and the two dispatchers.

    python bench/moe_dispatch.py [--tokens 4096] [--hidden 256] [--inter 128] [--experts 16] [--world 4]

1. expert compute forward+backward, balanced and skewed loads: torch._grouped_mm path vs the loop fallback vs a
   per-expert loop (the old reference), as time ratios to the loop;
2. the expert weight gradient alone, into a grad buffer: torch._grouped_mm's 2-D x 2-D mode + add vs one GEMM
   per expert into main_grad (tensor_parallel.wgrad.grouped_wgrad on CPU), at the large vs_transformers shapes
   and at the given ones;
3. MoELayer forward+backward at EP=world on gloo: all-to-all vs all-gather dispatcher, as a ratio.
CPU timings on a shared machine are noisy; read the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ascend.moe.experts import grouped_mm, loop_grouped_linear  # noqa: E402


def _loop(x, w, counts):
    out, s = [], 0
    for i, c in enumerate(counts):
        out.append(x[s:s + c] @ w[i])
        s += c
    return torch.cat(out)


def _time(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_grouped(tokens, hidden, inter, experts):
    torch.manual_seed(0)
    w = torch.randn(experts, hidden, inter, requires_grad=True)
    for name, counts in [("balanced", [tokens // experts] * experts),
                         ("skewed", [tokens - (experts - 1)] + [1] * (experts - 1))]:
        x = torch.randn(sum(counts), hidden, requires_grad=True)

        def run(f):
            return lambda: f(x, w, counts).sum().backward()
        t_loop = _time(run(_loop))
        t_native = _time(run(grouped_mm))
        t_fb = _time(run(lambda x_, w_, c_: loop_grouped_linear(x_, w_.transpose(1, 2), c_)))
        print(f"grouped matmul fwd+bwd [{name}] T={sum(counts)} h={hidden} I={inter} E={experts}: "
              f"grouped_mm/loop {t_native / t_loop:.2f}  fallback (loop_grouped_linear)/loop {t_fb / t_loop:.2f}")


def _dispatch_body(tokens, hidden, inter, experts, reps):
    import torch.distributed as dist
    from test_moe_common import setup_groups
    from megatron_ascend.config import ModelConfig
    from megatron_ascend.moe import MoELayer
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=inter,
                      num_hidden_layers=2, num_attention_heads=2, n_routed_experts=experts, n_shared_experts=0,
                      num_experts_per_tok=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, first_k_dense_replace=0, n_group=1, topk_group=1, init_method_std=0.1)
    out = {}
    for disp in ("alltoall", "allgather"):
        par, pg = setup_groups(1, dist.get_world_size(), None, False, disp)
        lay = MoELayer(cfg, par, pg, 0)
        x = torch.randn(tokens // 4, 4, hidden, requires_grad=True)

        def step():
            lay(x).sum().backward()
        step()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        dist.barrier()
        out[disp] = (time.perf_counter() - t) / reps
    return out


def bench_weight_grad(tokens, hidden, inter, experts, reps=10):
    """The expert weight gradient alone, accumulated into a grad buffer as training does: torch._grouped_mm's
    2-D x 2-D mode (one launch, a fresh [E, I, h] result) added into main_grad, vs one GEMM per expert written
    into main_grad (tensor_parallel.wgrad.grouped_wgrad under gradient-accumulation fusion, its CPU path)."""
    from megatron_ascend.tensor_parallel.wgrad import grouped_wgrad
    torch.manual_seed(0)
    counts = torch.multinomial(torch.ones(experts), tokens, replacement=True).bincount(minlength=experts).tolist()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy, w = torch.randn(tokens, hidden), torch.randn(tokens, inter), torch.randn(experts, inter, hidden)
    w.main_grad, w.fuse_wgrad = torch.zeros_like(w), True
    one = lambda: w.main_grad.add_(torch._grouped_mm(dy.t(), x, offs=offs))  # noqa: E731
    per = lambda: grouped_wgrad(dy, x, counts, w)  # noqa: E731  (not stale: accumulates, like one)
    t1 = t2 = float("inf")
    for _ in range(3):
        t1, t2 = min(t1, _time(one, reps)), min(t2, _time(per, reps))
    print(f"expert weight grad into main_grad T={tokens} h={hidden} I={inter} E={experts}: _grouped_mm 2-D mode + "
          f"add {t1 * 1e3:.2f} ms, per-expert GEMMs into main_grad {t2 * 1e3:.2f} ms, ratio {t1 / t2:.2f}x")


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for the weight-gradient comparison")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bench_weight_grad(2048, 1024, 256, 32)  # the large vs_transformers config's expert GEMMs
    bench_weight_grad(a.tokens, a.hidden, a.inter, a.experts)
    torch.set_num_threads(1)
    bench_grouped(a.tokens, a.hidden, a.inter, a.experts)
    from harness import run_distributed
    res = run_distributed(a.world, _dispatch_body, a.tokens // a.world, a.hidden, a.inter, a.experts, a.reps,
                          timeout=600)
    a2a = max(r["alltoall"] for r in res)
    ag = max(r["allgather"] for r in res)
    print(f"MoELayer fwd+bwd, EP={a.world} gloo, {a.tokens // a.world} tokens/rank: allgather/alltoall {ag / a2a:.2f}")


if __name__ == "__main__":
    main()
