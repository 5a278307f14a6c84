#!/usr/bin/env python
"""Accelerator check (one device): bf16 parity with the fp32 CPU model, then throughput and MFU of a training
step of a DeepSeek MoE that fills the device.

    python bench/device_mfu.py [--preset h200|h100] [--steps 6] [--peak-tflops 989] [--skip-parity]
    python bench/device_mfu.py --device cpu --preset tiny        (exercises every line here on CPU)

1. Parity: a tiny DeepSeek-V3 (MLA, MoE, MTP) built on CPU in fp32 and copied to the device in bf16 (params;
   fp32 grad buffer): loss and gradients compared with the fp32 CPU reference; prints the relative errors
   (bf16 expectation: loss ~1e-3, grads ~1e-2 relative in norm).
2. MFU: DistributedDataParallel (fp32 grad buffer, gradient-accumulation fusion) + our optimizer in bf16 mode
   (fp32 main params, flat fused AdamW), forward + backward + step, device-synchronised, warm-up discarded.
   Prints model TFLOP/s per device (monitoring.flops, Megatron's formula), MFU against the peak table
   (H200: 989 dense bf16) and against a bf16 GEMM ceiling measured in this process on the model's shapes.

Status: written for the sessions that are lent an H100 / H200 or an NPU; run here only with --device cpu. Not a
test. bench/device_check.py runs it as its step 3.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PRESETS = {
    # ~V2-Lite widths, 8 layers (1 dense + 7 MoE): ~4.6B params, 16 B/param of states ~ 74 GB + activations
    "h200": dict(model=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                            num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16,
                            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, q_lora_rank=None,
                            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                            max_position_embeddings=4096, num_nextn_predict_layers=0, aux_loss_alpha=0.001),
                 seq=4096, mbs=1, micro_batches=4),
    # the same widths, 4 layers (1 dense + 3 MoE): ~2.4B params, ~38 GB of states -- 64 GB NPUs (910B / a 910C
    # die) and 80 GB GPUs (H100)
    "h100": dict(model=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                            num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
                            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, q_lora_rank=None,
                            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                            max_position_embeddings=4096, num_nextn_predict_layers=0, aux_loss_alpha=0.001),
                 seq=4096, mbs=1, micro_batches=4),
    "tiny": dict(model=dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                            n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=64, kv_lora_rank=32,
                            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
                            num_nextn_predict_layers=0, aux_loss_alpha=0.001),
                 seq=256, mbs=1, micro_batches=2),
}
PARITY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, num_nextn_predict_layers=1,
              aux_loss_alpha=0.0)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elif dev.type == "npu":
        torch.npu.synchronize()


def _bf16(m):
    """The trainer's --bf16 cast (the router weight and fp32-marked params stay fp32)."""
    from megatron_ascend.training.parts import _cast_keep_fp32_buffers
    _cast_keep_fp32_buffers(m, torch.bfloat16)


def _loss(m, ids):
    out = m(ids, labels=ids, loss_mask=torch.ones(ids.shape, device=ids.device))
    loss = out["lm_loss"].float().mean()
    for x in out.get("mtp_losses") or []:
        loss = loss + out["mtp_loss_scale"] * x.float().mean()
    return loss


def parity(dev):
    from megatron_ascend.config import ModelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    cfg = ModelConfig(**PARITY)
    ref = DeepseekForCausalLM(cfg, init_seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    l_ref = _loss(ref, ids)
    l_ref.backward()
    dut = DeepseekForCausalLM(cfg, init_seed=3)
    _bf16(dut)
    dut.to(dev)
    l_dut = _loss(dut, ids.to(dev))
    l_dut.backward()
    worst, name = 0.0, ""
    for (n, a), (_, b) in zip(ref.named_parameters(), dut.named_parameters()):
        if a.grad is None or b.grad is None:
            continue
        e = float((a.grad - b.grad.float().cpu()).norm() / (a.grad.norm() + 1e-30))
        if e > worst:
            worst, name = e, n
    l_ref, l_dut = float(l_ref.detach()), float(l_dut.detach())
    dl = abs(l_ref - l_dut) / abs(l_ref)
    print(f"parity ({dev.type} bf16 vs cpu fp32): loss {l_ref:.6f} vs {l_dut:.6f} (rel {dl:.2e}); "
          f"worst grad rel-norm error {worst:.2e} ({name})")
    return dl, worst


def gemm_ceiling(cfg, T, dev, dtype, reps=10):
    """bf16 matmul TFLOP/s on the step's projection shapes (forward layout), FLOP-weighted."""
    h = cfg.hidden_size
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    te = max(1, T * cfg.num_experts_per_tok // cfg.n_routed_experts)
    shapes = [(T, h, cfg.num_attention_heads * qk), (T, cfg.kv_lora_rank, cfg.num_attention_heads *
              (cfg.qk_nope_head_dim + cfg.v_head_dim)), (T, cfg.num_attention_heads * cfg.v_head_dim, h),
              (te, h, cfg.moe_intermediate_size), (te, cfg.moe_intermediate_size, h), (T, h, cfg.vocab_size)]
    flops = secs = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(n, k, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b.t()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b.t()
        _sync(dev)
        secs += (time.perf_counter() - t0) / reps
        flops += 2 * m * k * n
    return flops / secs


def mfu(dev, preset, steps, peak):
    from megatron_ascend.config import ModelConfig, OptimizerConfig
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.monitoring.flops import model_flops_per_token
    from megatron_ascend.optimizer import build_optimizer
    spec = PRESETS[preset]
    cfg = ModelConfig(**spec["model"])
    seq, mbs, mb = spec["seq"], spec["mbs"], spec["micro_batches"]
    dtype = torch.bfloat16 if dev.type != "cpu" else torch.float32
    m = DeepseekForCausalLM(cfg)
    if dtype == torch.bfloat16:
        _bf16(m)
    m.to(dev)
    n_params = sum(p.numel() for p in m.parameters())
    ddp = DistributedDataParallel(m)
    opt = build_optimizer(ddp, OptimizerConfig(lr=1e-4, clip_grad=1.0, bf16=dtype == torch.bfloat16), None)
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq), device=dev)

    def step():
        opt.zero_grad()
        for i in range(mb):
            loss = _loss(m, ids) / mb
            if i < mb - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        opt.step()

    ts = []
    for i in range(steps + 2):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    t = statistics.median(ts)
    flops = model_flops_per_token(cfg, seq) * seq * mbs * mb
    achieved = flops / t
    ceiling = gemm_ceiling(cfg, seq * mbs, dev, dtype)
    from megatron_ascend import platform
    mem = platform.memory_stats()["max_allocated"] / 2 ** 30 if dev.type != "cpu" else float("nan")
    print(f"mfu ({dev.type}, {preset}: {n_params / 1e9:.2f}B params, seq {seq} x mbs {mbs} x {mb} micro-batches, "
          f"{dtype}): step {t * 1e3:.0f} ms (min-max {min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}), "
          f"{achieved / 1e12:.1f} TFLOP/s, tokens/s {seq * mbs * mb / t:.0f}, peak memory {mem:.1f} GiB")
    if peak:
        print(f"   MFU vs peak {peak:.0f} TFLOP/s: {achieved / (peak * 1e12):.3f}")
    print(f"   measured GEMM ceiling {ceiling / 1e12:.1f} TFLOP/s -> utilisation of it {achieved / ceiling:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--device", default=None, help="cuda | npu | cpu (default: the platform's device)")
    ap.add_argument("--preset", default="h200", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-parity", action="store_true")
    a = ap.parse_args()
    from megatron_ascend.platform import get_platform, peak_tflops, tune_host_allocator
    tune_host_allocator()
    plat = get_platform()
    dev = torch.device(a.device) if a.device else plat.device()
    name = plat.device_name if dev.type == plat.kind else dev.type
    peak = peak_tflops(name, a.peak_tflops) if dev.type != "cpu" else a.peak_tflops
    print(f"device {name}, torch {torch.__version__}")
    if not a.skip_parity:
        parity(dev)
    mfu(dev, a.preset, a.steps, peak)


if __name__ == "__main__":
    main()
