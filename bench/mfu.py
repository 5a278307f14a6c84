#!/usr/bin/env python
"""Model FLOP utilisation on CPU: model FLOPs per step / (step time x the machine's matmul FLOP/s measured in the
same process on the model's own GEMM shapes), single process and at 2 ranks (TP2, EP2).

    python bench/mfu.py [--reps 6] [--world 1,2] [--profile]

FLOPs: monitoring.flops.model_flops_per_token (Megatron's formula; fwd + bwd). The denominator P_gemm is the
median FLOP/s of torch.matmul on the step's GEMMs ([T,h]x[h,*] projections, [T k/E, h]x[h, I] expert GEMMs,
[T,h]x[h,V] head), each in the three operand layouts a training step runs (forward x W^T, input grad dY W,
weight grad dY^T X), weighted by their FLOPs, timed just before the run with the same thread count. The
forward-layout-only ceiling (higher on CPU: the transposed layouts run slower) is printed beside it. A step is
forward + backward + optimizer step of DeepseekForCausalLM (hidden 1024, 8 experts) as our trainer runs it:
DistributedDataParallel (flat grad buffer) + megatron_ascend.optimizer (grad norm, clip 1.0, flat fused AdamW). With --profile, torch.profiler's
top self-CPU ops of one step name what eats the time that is not GEMM. Single process it is printed for 1
micro-batch per optimizer step (the optimizer's memory-bound AdamW + grad norm over all 31M params then weigh on
only 512 tokens) and for 4 micro-batches accumulated per step (``--micro-batches``; a real run accumulates
many). Target (issue 11): >= 0.6 single process.
Not a test.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ascend.config import ModelConfig, ParallelConfig  # noqa: E402

CFG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=2,
           first_k_dense_replace=1, num_attention_heads=8, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
           v_head_dim=64, max_position_embeddings=2048, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
SEQ, MBS = 512, 1


def gemm_shapes(cfg: ModelConfig, T: int):
    """(m, k, n) of the forward GEMMs of one step (backward repeats them as two GEMMs of the same FLOPs)."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    out = []
    for i in range(cfg.num_hidden_layers):
        out += [(T, h, cfg.q_lora_rank), (T, cfg.q_lora_rank, n * qk), (T, h, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                (T, cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim)), (T, n * cfg.v_head_dim, h)]
        if cfg.is_moe_layer(i):
            te = T * cfg.num_experts_per_tok // cfg.n_routed_experts
            I = cfg.moe_intermediate_size
            out += [(te, h, I)] * (2 * cfg.n_routed_experts) + [(te, I, h)] * cfg.n_routed_experts
            out += [(T, h, I * cfg.n_shared_experts)] * 2 + [(T, I * cfg.n_shared_experts, h)]
        else:
            out += [(T, h, cfg.intermediate_size)] * 2 + [(T, cfg.intermediate_size, h)]
    out.append((T, h, cfg.vocab_size))
    return out


def _times(fn, reps):
    """Wall times of ``reps`` calls of fn (after one untimed warm-up call)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def _gemm_ops(m, k, n, layouts):
    """The GEMMs of a linear layer y[m, n] = x[m, k] W[n, k]^T as the training step runs them: forward x W^T,
    input grad dY W, weight grad dY^T X (``layouts`` 'fwd' or 'train' = all three)."""
    x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    ops = [lambda: torch.matmul(x, w.t())]
    if layouts == "train":
        ops += [lambda: torch.matmul(dy, w), lambda: torch.matmul(dy.t(), x)]
    return ops


def gemm_flops_per_s(shapes, reps=5, layouts="train") -> float:
    """FLOP-weighted matmul throughput on these shapes: sum of FLOPs / sum of median times. ``layouts='train'``
    times each shape's forward, input-grad and weight-grad GEMM (the operand layouts a step runs: the
    transposed ones are slower on CPU); ``'fwd'`` only the forward one."""
    flops = secs = 0.0
    for m, k, n in sorted(set(shapes)):
        cnt = shapes.count((m, k, n))
        for op in _gemm_ops(m, k, n, layouts):
            ts = _times(op, reps)
            flops += 2 * m * k * n * cnt
            secs += statistics.median(ts) * cnt
    return flops / secs


def _step_times(par, groups, reps, profile=False, micro_batches=1):
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    from megatron_ascend.config import OptimizerConfig
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.optimizer import build_optimizer
    m = DeepseekForCausalLM(cfg, par, groups)
    ddp = DistributedDataParallel(m, groups)
    opt = build_optimizer(ddp, OptimizerConfig(lr=1e-4, weight_decay=0.01, clip_grad=1.0), groups)
    ids = torch.randint(0, cfg.vocab_size, (MBS, SEQ))
    mask = torch.ones(MBS, SEQ)

    def step():
        opt.zero_grad()
        for i in range(micro_batches):  # gradient accumulation: all but the last backward inside no_sync
            out = m(ids, labels=ids, loss_mask=mask)
            loss = (out["lm_loss"] * mask).sum() / (mask.sum() * micro_batches)
            if i < micro_batches - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        opt.step()

    ts = _times(step, reps)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return ts, table


def _dist_body(kind, reps):
    import torch.distributed as dist
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.platform import tune_host_allocator
    tune_host_allocator()
    n = dist.get_world_size()
    par = ParallelConfig(world_size=n, tensor_model_parallel_size=n if kind == "tp" else 1,
                         expert_model_parallel_size=n if kind == "ep" else 1,
                         expert_tensor_parallel_size=1, sequence_parallel=kind == "tp")
    g = initialize_model_parallel(par)
    ts, _ = _step_times(par, g, reps)
    cfg = ModelConfig(**CFG)
    p_gemm = gemm_flops_per_s(gemm_shapes(cfg, SEQ * MBS // (n if kind == "tp" else 1)))
    return ts, p_gemm


def main():
    from megatron_ascend.monitoring.flops import model_flops_per_token
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--world", default="1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--micro-batches", default="1,4",
                    help="micro-batches per optimizer step to report (single process), comma-separated")
    a = ap.parse_args()
    from megatron_ascend.platform import tune_host_allocator
    print(f"host allocator kept warm (platform.tune_host_allocator, as the trainer does on CPU): "
          f"{tune_host_allocator()}")
    cfg = ModelConfig(**CFG)
    f_step = model_flops_per_token(cfg, SEQ) * SEQ * MBS
    print(f"model: h {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-"
          f"{cfg.num_experts_per_tok}, seq {SEQ} x mbs {MBS}: {f_step / 1e9:.2f} GFLOP per step")
    if "1" in a.world.split(","):
        torch.set_num_threads(a.threads)
        p_gemm = gemm_flops_per_s(gemm_shapes(cfg, SEQ * MBS))
        p_fwd = gemm_flops_per_s(gemm_shapes(cfg, SEQ * MBS), layouts="fwd")
        print(f"P_gemm {p_gemm / 1e9:.1f} GFLOP/s (forward layouts only: {p_fwd / 1e9:.1f})")
        for mb in (int(x) for x in a.micro_batches.split(",")):
            ts, table = _step_times(ParallelConfig(), None, a.reps, a.profile, mb)
            t = statistics.median(ts)
            f = f_step * mb
            print(f"1 process, {a.threads} threads, {mb} micro-batch(es) per step: step {t * 1e3:.0f} ms "
                  f"(min-max {min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}), achieved {f / t / 1e9:.1f} GFLOP/s, "
                  f"MFU(gemm) = {f / t / p_gemm:.2f} (vs the forward-layout ceiling: {f / t / p_fwd:.2f})")
            if table:
                print(table)
    if "2" in a.world.split(","):
        from tests.harness import run_distributed
        for kind in ("tp", "ep"):
            res = run_distributed(2, _dist_body, kind, a.reps, timeout=900)
            t = max(statistics.median(r[0]) for r in res)
            p = statistics.median([r[1] for r in res])
            # TP2: one model replica's micro-batch split over the 2 ranks; EP2 (dp = 2): each rank runs its own
            # micro-batch through the replicated dense part, the experts see both -> twice the model FLOPs
            replicas = 2 if kind == "ep" else 1
            print(f"2 ranks {kind.upper()}2 (1 thread each, {replicas} micro-batch(es) of {SEQ} tokens in all): "
                  f"step {t * 1e3:.0f} ms, P_gemm/rank {p / 1e9:.1f} GFLOP/s, "
                  f"MFU(gemm) = {replicas * f_step / t / (2 * p):.2f}")


if __name__ == "__main__":
    main()
