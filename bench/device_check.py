#!/usr/bin/env python
"""The first thing to run on an NPU or a GPU: does this device train the model as the CPU does, with which
kernels, how fast?  One command, every figure printed (no assertion: a verdict per comparison).

    python bench/device_check.py                       # the platform's device (npu / cuda), ~3-5 min on an H100
    python bench/device_check.py --device cpu --preset tiny --mfu-steps 1     (exercises every step on CPU)

1. Training, same weights: ``python -m megatron_ascend.pretrain`` on a small DeepSeek-V3 (MLA, MoE with
   noaux_tc routing, MTP, mock data, the same --seed, so the same initial weights and batches) for --steps
   iterations on the device in bf16 and on the CPU in fp32; prints each iteration's lm loss on both and their
   relative difference (bf16 expectation: below ~2e-2), the device run's tokens/s, TFLOP/s and MFU (the
   trainer's log line), its platform and ``kernels (...)`` start-up lines (which implementation of each
   kernel-table entry ran: torch_npu / MindSpeed on Ascend, SDPA / torch._grouped_mm on CUDA) and the CPU
   run's checkpoint.
2. Forward, same weights: ``tools/forward.py --load`` that checkpoint on the device (bf16) and on the CPU (fp32):
   max |logit difference| relative to max |logit|, and the per-token loss difference.
3. MFU at scale (bench/device_mfu.py's step, skipped with --mfu-steps 0): a DeepSeek MoE that fills the device
   (--preset: h100 ~2.4B params for 64-80 GB devices, h200 ~4.6B for 141 GB, tiny for CPU), forward + backward +
   AdamW step, TFLOP/s and MFU against the platform's peak table and a GEMM ceiling measured on the model's
   shapes.

Every sub-run is a subprocess (the CPU one with MEGATRON_ASCEND_DEVICE=cpu), so the device run is the path a
user launches, flags and all. Status: run here only with --device cpu; no NPU or GPU has run it yet
(docs/ASCEND.md, docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = ("--num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8 --q-lora-rank 128 "
         "--kv-lora-rank 64 --qk-head-dim 32 --qk-pos-emb-head-dim 16 --v-head-dim 32 --num-experts 16 "
         "--moe-ffn-hidden-size 128 --n-shared-experts 1 --moe-router-topk 4 --first-k-dense-replace 1 "
         "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-router-num-groups 4 "
         "--moe-router-group-topk 2 --moe-aux-loss-coeff 1e-3 --mtp-num-layers 1 --vocab-size 2048 "
         "--make-vocab-size-divisible-by 1 --max-position-embeddings 1024 --seq-length 512 --micro-batch-size 2 "
         "--global-batch-size 8 --lr 1e-4 --min-lr 1e-5 --mock-data --seed 1234 "
         "--eval-interval 1000 --log-interval 1")
TINY_MODEL = MODEL.replace("--hidden-size 256", "--hidden-size 64").replace("--seq-length 512", "--seq-length 32") \
    .replace("--num-layers 4", "--num-layers 2").replace("--global-batch-size 8", "--global-batch-size 4") \
    .replace("--vocab-size 2048", "--vocab-size 256").replace("--num-experts 16", "--num-experts 8") \
    .replace("--moe-router-topk 4", "--moe-router-topk 2").replace("--q-lora-rank 128", "--q-lora-rank 32") \
    .replace("--kv-lora-rank 64", "--kv-lora-rank 16").replace("--moe-ffn-hidden-size 128", "--moe-ffn-hidden-size 32")
BF16_REL = 2e-2  # bf16 vs fp32: ~2**-8 per rounding, a few layers deep


def _env(device: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MEGATRON_ASCEND_DEVICE", None)
    if device:
        env["MEGATRON_ASCEND_DEVICE"] = device
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd: List[str], device: Optional[str], what: str) -> str:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(device), capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        print(f"[{what}] FAILED (exit {p.returncode}) after {time.time() - t0:.0f} s:\n{out[-4000:]}")
        raise SystemExit(1)
    print(f"[{what}] {time.time() - t0:.0f} s")
    return out


def _iterations(log: str) -> Dict[int, Dict[str, str]]:
    rows = {}
    for line in log.splitlines():
        m = re.match(r"\s*iteration\s+(\d+)/", line)
        if m:
            fields = dict(p.strip().split(": ", 1) for p in line.split("|")[1:] if ": " in p)
            rows[int(m.group(1))] = fields
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def training(model: str, steps: int, device: Optional[str], work: str, extra: List[str]) -> None:
    base = [sys.executable, "-m", "megatron_ascend.pretrain"] + model.split() + ["--train-iters", str(steps)]
    cpu = _run(base + ["--save", os.path.join(work, "ckpt"), "--save-interval", str(steps)], "cpu",
               "train cpu fp32")
    dev = _run(base + ["--bf16"] + extra, device, f"train {device or 'device'} bf16")
    for line in dev.splitlines():
        if line.startswith(("platform", "kernels")):
            print("   " + line)
    rc, rd = _iterations(cpu), _iterations(dev)
    print(f"   {'iter':>4} {'lm loss cpu fp32':>17} {'lm loss device bf16':>20} {'rel diff':>9}")
    worst = 0.0
    for it in sorted(rc):
        a, b = float(rc[it]["lm loss"]), float(rd[it]["lm loss"])
        worst = max(worst, _rel(b, a))
        print(f"   {it:>4} {a:>17.6f} {b:>20.6f} {_rel(b, a):>9.2e}")
    print(f"   loss: worst rel diff {worst:.2e} -> {'OK' if worst < BF16_REL else 'LARGER THAN'} bf16 tolerance "
          f"{BF16_REL:g}")
    last = rd[max(rd)]
    print(f"   device run, iteration {max(rd)}: tokens/s {last.get('tokens/s')}, TFLOP/s/device "
          f"{last.get('throughput per device (TFLOP/s/device)')}, MFU {last.get('MFU')}, "
          f"{last.get('mem max allocated (GiB)', '')} GiB max allocated")


def forward(work: str, device: Optional[str]) -> None:
    import torch
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, os.path.join(work, "ids.pt"))
    base = [sys.executable, "tools/forward.py", "--load", os.path.join(work, "ckpt"), "--input-ids",
            os.path.join(work, "ids.pt"), "--labels-from-input", "--output"]
    _run(base + [os.path.join(work, "cpu.pt")], "cpu", "forward cpu fp32")
    _run(base + [os.path.join(work, "dev.pt"), "--dtype", "bf16"], device, f"forward {device or 'device'} bf16")
    a = torch.load(os.path.join(work, "cpu.pt"), weights_only=True)
    b = torch.load(os.path.join(work, "dev.pt"), weights_only=True)
    dl = float((a["logits"] - b["logits"]).abs().max()) / float(a["logits"].abs().max())
    mask = a["labels"] != -100
    dloss = float((a["loss"] - b["loss"])[mask].abs().max())
    mean_rel = _rel(float(b["loss"][mask].mean()), float(a["loss"][mask].mean()))
    print(f"   logits: max |diff| / max |logit| {dl:.2e}; per-token loss: max |diff| {dloss:.2e}, mean loss rel "
          f"diff {mean_rel:.2e} -> {'OK' if dl < BF16_REL and mean_rel < BF16_REL else 'LARGER THAN'} bf16 tolerance")


def mfu(device: Optional[str], preset: str, steps: int, peak: Optional[float]) -> None:
    cmd = [sys.executable, "bench/device_mfu.py", "--preset", preset, "--steps", str(steps)]
    if device:
        cmd += ["--device", device]
    if peak:
        cmd += ["--peak-tflops", str(peak)]
    out = _run(cmd, device if device == "cpu" else None, f"mfu {preset}")
    for line in out.splitlines():
        if line.startswith(("device", "parity", "mfu", "   ")):
            print("   " + line.strip())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="npu | cuda | cpu (default: what the platform detects)")
    ap.add_argument("--preset", default="h100", help="bench/device_mfu.py preset for step 3: h100, h200, tiny")
    ap.add_argument("--steps", type=int, default=5, help="training iterations compared in step 1")
    ap.add_argument("--mfu-steps", type=int, default=4, help="timed steps of step 3 (0 skips it)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the table)")
    ap.add_argument("--tiny", action="store_true", help="a 64-wide model in steps 1-2 (implied by --preset tiny)")
    ap.add_argument("--keep", default=None, help="keep the checkpoint and outputs in this directory")
    a = ap.parse_args(argv)
    tiny = a.tiny or a.preset == "tiny"
    work = a.keep or tempfile.mkdtemp(prefix="device_check_")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    try:
        import torch
        print(f"# device_check: device {a.device or 'auto'}, torch {torch.__version__}, work dir {work}")
        extra = ["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []
        print("1. training, same weights and batches: device bf16 vs cpu fp32")
        training(TINY_MODEL if tiny else MODEL, a.steps, a.device, work, extra)
        print("2. tools/forward.py on the checkpoint: device bf16 vs cpu fp32")
        forward(work, a.device)
        if a.mfu_steps > 0:
            print(f"3. MFU at scale (bench/device_mfu.py --preset {a.preset})")
            mfu(a.device, a.preset, a.mfu_steps, a.peak_tflops)
        print(f"# done in {time.time() - t0:.0f} s")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
