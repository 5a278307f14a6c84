#!/usr/bin/env python
"""Exposed gradient communication with and without overlapping the bucket reductions with backward.

    python bench/grad_overlap.py [--world 4] [--steps 6] [--bucket-mib 2]

Each rank trains an MLP stack (8.4M params, fp32) under DistributedDataParallel at DP = world (gloo on CPU,
or the platform's backend under torchrun). Per step it times the backward (compute, plus reductions
launched from the hooks when overlapping) and ``finish_grad_sync`` (the communication left exposed after
backward). Prints the median over steps, after one warm-up step, for: no overlap (one bucket), no overlap
(buckets), overlap (buckets), with both distributed-optimizer settings, and the exposed-comm ratio
overlap / no-overlap. Not a test: on a shared 2-core CPU the gloo threads compete with the backward for
cores, so the ratio says little about an accelerator; run it under torchrun on real devices for that.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H, LAYERS = 512, 8


def _body(steps, bucket_elems):
    import torch
    from torch import nn
    from megatron_ascend.config import OptimizerConfig, ParallelConfig
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.optimizer import build_optimizer
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.platform import get_platform, synchronize
    import torch.distributed as dist
    pg = initialize_model_parallel(ParallelConfig(world_size=dist.get_world_size()))
    dev = get_platform().device()
    results = {}
    for name, overlap, bucket, distributed in (
            ("no overlap, 1 bucket", False, None, False),
            ("no overlap, buckets", False, bucket_elems, False),
            ("overlap, buckets", True, bucket_elems, False),
            ("no overlap, 1 bucket, distopt", False, None, True),
            ("overlap, buckets, distopt", True, bucket_elems, True)):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
                                for _ in range(LAYERS)]).to(dev)
        ddp = DistributedDataParallel(model, pg, bucket_size=bucket, overlap_grad_reduce=overlap,
                                      use_distributed_optimizer=distributed)
        opt = build_optimizer(ddp, OptimizerConfig(lr=1e-4, clip_grad=0.0), pg)
        x = torch.randn(256, H, device=dev)
        bw, exposed = [], []
        for s in range(steps + 1):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            synchronize()
            t0 = time.perf_counter()
            loss.backward()
            synchronize()
            t1 = time.perf_counter()
            ddp.finish_grad_sync()
            synchronize()
            t2 = time.perf_counter()
            opt.step()
            if s:
                bw.append(t1 - t0)
                exposed.append(t2 - t1)
        results[name] = (statistics.median(bw), statistics.median(exposed),
                         len([b for buf in ddp.grad_buffers for b in buf.buckets]))
    return results


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bucket-mib", type=float, default=2.0, help="bucket size in MiB of fp32 grads")
    a = ap.parse_args()
    bucket = int(a.bucket_mib * 2 ** 20 / 4)
    if "RANK" in os.environ:  # under torchrun
        from megatron_ascend.platform import init_distributed
        init_distributed()
        res = _body(a.steps, bucket)
        import torch.distributed as dist
        if dist.get_rank() != 0:
            return
    else:
        from tests.harness import run_distributed
        res = run_distributed(a.world, _body, a.steps, bucket, timeout=600)[0]
    n = LAYERS * (2 * H * H * 2 + 3 * H)
    print(f"DP{a.world}: {n / 1e6:.2f}M fp32 params ({n * 4 / 2 ** 20:.1f} MiB of grads), bucket {a.bucket_mib} MiB; "
          f"median of {a.steps} steps on rank 0")
    print(f"{'setting':<32}{'buckets':>8}{'backward ms':>13}{'exposed comm ms':>17}{'bw + exposed ms':>17}")
    for name, (bw, ex, nb) in res.items():
        print(f"{name:<32}{nb:>8}{bw * 1e3:>13.1f}{ex * 1e3:>17.1f}{(bw + ex) * 1e3:>17.1f}")
    for tag, a_, b_ in (("all-reduce", "overlap, buckets", "no overlap, 1 bucket"),
                        ("distopt", "overlap, buckets, distopt", "no overlap, 1 bucket, distopt")):
        print(f"exposed comm overlap / no overlap ({tag}): {res[a_][1] / res[b_][1]:.3f}; "
              f"backward+exposed ratio {sum(res[a_][:2]) / sum(res[b_][:2]):.3f}")


if __name__ == "__main__":
    main()
