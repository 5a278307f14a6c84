#!/usr/bin/env python
"""Model-state memory per rank (params + grads + main params + optimizer states), measured from the live
tensors after one real step, against the analytic figure (megatron_ascend.optimizer.analytic_model_state_bytes,
which the planner reuses).

    python bench/memory.py                 # 4 gloo ranks, DP4 x EP2 (expert-dp 2), a ~1.3M-param model

For each of bf16 / fp32 x replicated / distributed optimizer it prints, for rank 0: measured MiB, analytic
MiB, measured / analytic, bytes per parameter, and the padding the 64-element alignment of the distributed
optimizer adds. Not a test (tests/test_optimizer.py asserts the equality at alignment 1).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD, EP = 4, 2
H, LAYERS, E, FE = 256, 4, 8, 128  # hidden, dense layers, experts, expert ffn


def _model(pg, dtype):
    import torch
    from torch import nn
    from megatron_ascend.tensor_parallel.sharding import init_normal_, mark_sharded

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()
            for i in range(LAYERS):
                blk = nn.Module()
                blk.norm = mark_sharded(nn.Parameter(torch.ones(H, dtype=dtype)))
                blk.fc1 = mark_sharded(nn.Parameter(torch.empty(4 * H, H, dtype=dtype)))
                blk.fc2 = mark_sharded(nn.Parameter(torch.empty(H, 4 * H, dtype=dtype)))
                self.layers.append(blk)
            el = E // pg.ep_size
            self.experts_up = mark_sharded(nn.Parameter(torch.empty(el, FE, H, dtype=dtype)),
                                           {0: ("ep", pg.ep_rank, pg.ep_size)}, is_expert=True)
            self.experts_down = mark_sharded(nn.Parameter(torch.empty(el, H, FE, dtype=dtype)),
                                             {0: ("ep", pg.ep_rank, pg.ep_size)}, is_expert=True)
            for n, p in self.named_parameters():
                if p.dim() > 1:
                    init_normal_(p, n, 0.02, 1, expert_dim=0 if p.is_expert else None)

        def forward(self, x):
            for blk in self.layers:
                y = x * blk.norm
                x = x + torch.tanh(y @ blk.fc1.t()) @ blk.fc2.t()
            # every rank's experts see its tokens (no dispatch: this bench is about memory, not routing)
            out = sum(torch.tanh(x @ self.experts_up[e].t()) @ self.experts_down[e].t()
                      for e in range(self.experts_up.shape[0]))
            return (x + out).float().pow(2).mean()
    return M()


def _body():
    import torch
    from megatron_ascend.config import OptimizerConfig, ParallelConfig
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.optimizer import analytic_model_state_bytes, build_optimizer, model_state_bytes
    from megatron_ascend.parallel_state import initialize_model_parallel
    pg = initialize_model_parallel(ParallelConfig(world_size=WORLD, expert_model_parallel_size=EP))
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for distributed in (False, True):
            model = _model(pg, dtype)
            ddp = DistributedDataParallel(model, pg, use_distributed_optimizer=distributed)
            opt = build_optimizer(ddp, OptimizerConfig(lr=1e-4, bf16=dtype == torch.bfloat16), pg)
            x = torch.randn(8, H, generator=torch.Generator().manual_seed(pg.rank)).to(dtype)
            model(x).backward()
            assert opt.step()[0]
            got = model_state_bytes(ddp, opt)
            dense = sum(p.numel() for p in model.parameters() if not p.is_expert)
            expert = sum(p.numel() for p in model.parameters() if p.is_expert)
            want = analytic_model_state_bytes(dense, expert, pg.size("dp_cp"), pg.edp_size,
                                              bf16=dtype == torch.bfloat16, distributed=distributed)
            rows.append((str(dtype).replace("torch.", ""), distributed, got, want, dense + expert))
    return rows


def main():
    from tests.harness import run_distributed
    rows = run_distributed(WORLD, _body, timeout=600)[0]
    mib = 2.0 ** 20
    print(f"model-state memory on rank 0 of DP{WORLD} x EP{EP} (expert-dp {WORLD // EP}); "
          f"{rows[0][4] / 1e6:.2f}M local params")
    print(f"{'dtype':<9}{'distopt':<9}{'measured MiB':>13}{'analytic MiB':>13}{'ratio':>8}{'B/param':>9}"
          f"{'padding KiB':>12}   params / grads / main / states (MiB)")
    for dt, distributed, got, want, n in rows:
        print(f"{dt:<9}{str(distributed):<9}{got['total'] / mib:>13.3f}{want['total'] / mib:>13.3f}"
              f"{got['total'] / want['total']:>8.4f}{got['total'] / n:>9.2f}{got['padding'] / 1024:>12.1f}   "
              + " / ".join(f"{got[k] / mib:.3f}" for k in ("params", "grads", "main_params", "optimizer_states")))


if __name__ == "__main__":
    main()
