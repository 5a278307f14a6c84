#!/usr/bin/env python
"""Peak memory of HF <-> megatron_ascend conversion against the model size and the largest shard.

    python bench/convert_memory.py [--hidden 512 --layers 6 --experts 32 --shard-mb 64 --workers 1]
    python bench/convert_memory.py --model v4 [--hidden 512 --layers 6 --experts 32 --shard-mb 64]

V3 (default): writes a random DeepSeek-V3-shaped HF directory (hub names, per-expert tensors, several
safetensors shards), then runs hf2ma and ma2hf each in a fresh process.
V4: writes a random DeepSeek-V4 directory in DeepSeek's original naming and storage (FP8 e4m3 + e8m0 128x128
scales, FP4 e2m1 experts + e8m0 1x32 scales, sliding / CSA / HCA layers, a hash layer, MTP), then runs hf2hf
(dequantise to bf16, transformers' names), and hf2ma / ma2hf from it when this tree's model builds V4 (else it
says so).
Each run prints its peak RSS, the RSS of a process that only imports torch + megatron_ascend (baseline), the
total model bytes, the largest tensor / output shard and the largest HF file, and the ratios. Streaming means
the RSS increase during a conversion tracks the largest tensor / output shard, not the model. Each child pins
glibc's mmap threshold as tools/convert_ckpt.py does (CONVERT_MEMORY_NO_PIN=1: not, to see the difference).
A benchmark: prints numbers, asserts nothing.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MB = 2 ** 20


def make_hf(d, hidden, layers, experts, shard_bytes):
    import torch
    from safetensors.torch import save_file
    from megatron_ascend.config import ModelConfig
    from megatron_ascend.checkpointing.hf import expected_tensors
    from megatron_ascend.models.deepseek.hf_names import hf_names_for
    cfg = ModelConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=4 * hidden,
                      moe_intermediate_size=hidden, num_hidden_layers=layers, first_k_dense_replace=1,
                      num_attention_heads=8, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=experts, n_shared_experts=1,
                      num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=1)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, size, n, wm = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fn = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(d, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in shard})
            shard, size = {}, 0

    def add(name, shape):
        nonlocal size
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2

    for ma, shape in expected_tensors(cfg).items():
        names = hf_names_for(ma, cfg)
        if ".mlp.experts." in ma:
            for hn in names[1:]:
                add(hn, shape[1:])
        else:
            add(names[0], shape)
    L = cfg.num_hidden_layers
    add(f"model.layers.{L}.embed_tokens.weight", (cfg.vocab_size, hidden))
    add(f"model.layers.{L}.shared_head.head.weight", (cfg.vocab_size, hidden))
    flush()
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = "bfloat16"
    json.dump(hf_cfg, open(os.path.join(d, "config.json"), "w"))
    files = [os.path.getsize(os.path.join(d, f)) for f in set(wm.values())]
    return sum(files), max(files), n


def make_v4(d, hidden, layers, experts, shard_bytes):
    """Random V4 release (original naming, FP8 / FP4 with e8m0 scales) in shards of ~shard_bytes."""
    import torch
    from safetensors.torch import save_file
    from megatron_ascend.config import ModelConfig
    from megatron_ascend.checkpointing.v4_names import release_inventory
    cfg = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 8192,
           "hidden_size": hidden, "moe_intermediate_size": hidden, "num_hidden_layers": layers,
           "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 128, "qk_rope_head_dim": 64,
           "q_lora_rank": hidden // 2, "o_groups": 4, "o_lora_rank": hidden // 4,
           "compress_ratios": ([0] + [4, 128] * layers)[:layers] + [0], "compress_rope_theta": 160000.0,
           "index_n_heads": 8, "index_head_dim": 128, "index_topk": 64, "sliding_window": 128,
           "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 4, "num_hash_layers": 1,
           "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4,
           "num_nextn_predict_layers": 1, "max_position_embeddings": 4096, "expert_dtype": "fp4",
           "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                   "weight_block_size": [128, 128]}}
    g = torch.Generator().manual_seed(0)
    os.makedirs(d, exist_ok=True)
    shard, size, n, wm, bf16_total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fn = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(d, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in shard})
            shard, size = {}, 0

    def add(name, t):
        nonlocal size
        nb = t.numel() * t.element_size()
        if size + nb > shard_bytes:
            flush()
        shard[name] = t
        size += nb

    for name, spec in release_inventory(ModelConfig.from_hf_dict(cfg)).items():
        shape = spec.shape
        bf16_total += 2 * math.prod(shape) if spec.storage != "fp32" else 4 * math.prod(shape)
        base = name[: -len(".weight")]
        if spec.storage == "fp8":
            add(name, (torch.randn(shape, generator=g) * 10).to(torch.float8_e4m3fn))
            sc = (-(-shape[0] // 128), -(-shape[1] // 128))
            add(base + ".scale", torch.randint(120, 131, sc, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu))
        elif spec.storage == "fp4":
            add(name, torch.randint(0, 256, (shape[0], shape[1] // 2), generator=g, dtype=torch.uint8).view(torch.int8))
            add(base + ".scale", torch.randint(120, 131, (shape[0], shape[1] // 32), generator=g,
                                               dtype=torch.uint8).view(torch.float8_e8m0fnu))
        elif spec.storage == "int":
            add(name, torch.randint(0, experts, shape, generator=g, dtype=torch.int32))
        else:
            add(name, torch.randn(shape, generator=g).to(torch.float32 if spec.storage == "fp32" else torch.bfloat16))
    flush()
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    files = [os.path.getsize(os.path.join(d, f)) for f in set(wm.values())]
    return sum(files), max(files), n, bf16_total


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
from megatron_ascend.checkpointing import hf
import os, threading
if os.environ.get("CONVERT_MEMORY_NO_PIN") != "1":
    hf.fix_malloc_threshold()  # as tools/convert_ckpt.py does
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
peak = [before]
done = threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], rss())
threading.Thread(target=sample, daemon=True).start()
t = time.time()
mode = sys.argv[1]
if mode == "hf2ma":
    rep = hf.convert_hf_to_ma(sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False)
elif mode == "ma2hf":
    rep = hf.convert_ma_to_hf(sys.argv[2], sys.argv[3], max_shard_bytes=int(sys.argv[4]), progress=False)
elif mode == "hf2hf":
    from megatron_ascend.checkpointing.hf_rewrite import convert_hf_to_hf
    rep = convert_hf_to_hf(sys.argv[2], sys.argv[3], max_shard_bytes=int(sys.argv[4]), progress=False)
else:
    rep = {{}}
rep = {{k: v for k, v in rep.items() if isinstance(v, (int, float))}}
rep["seconds"] = time.time() - t
done.set()
peak[0] = max(peak[0], rss())
rep["rss_before"] = before
rep["rss_peak_during"] = peak[0]
rep["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rep["peak_rss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print("JSON" + json.dumps(rep))
"""


def child(*args, may_fail=False):
    script = _CHILD.format(repo=REPO)
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        if may_fail:
            return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        raise SystemExit(out.stderr[-3000:])
    line = [x for x in out.stdout.splitlines() if x.startswith("JSON")][-1]
    return json.loads(line[4:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--shard-mb", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", choices=("v3", "v4"), default="v3")
    a = p.parse_args()
    if a.model == "v4":
        return main_v4(a)
    with tempfile.TemporaryDirectory(prefix="convert_mem_") as tmp:
        t = time.time()
        total, largest_file, nfiles = make_hf(os.path.join(tmp, "hf"), a.hidden, a.layers, a.experts, a.shard_mb * MB)
        print(f"HF dir: {total / MB:.1f} MiB bf16 in {nfiles} files (largest {largest_file / MB:.1f} MiB), "
              f"written in {time.time() - t:.1f} s")
        base = child("none")["peak_rss"]
        r1 = child("hf2ma", os.path.join(tmp, "hf"), os.path.join(tmp, "ma"), a.workers)
        r2 = child("ma2hf", os.path.join(tmp, "ma"), os.path.join(tmp, "back"), a.shard_mb * MB)
        print(f"process peak RSS after imports only: {base / MB:.1f} MiB (the import high-water mark)")
        for name, r, unit in (("hf2ma", r1, r1.get("largest_tensor_bytes", 0)),
                              ("ma2hf", r2, r2.get("largest_shard_bytes", 0))):
            peak = r["rss_peak_during"]
            extra = peak - r["rss_before"]
            print(f"{name}: RSS {r['rss_before'] / MB:.1f} MiB before, peak {peak / MB:.1f} MiB during "
                  f"(+{extra / MB:.1f}; sampled every 2 ms) in {r['seconds']:.1f} s | "
                  f"model {total / MB:.1f} MiB -> increase/model {extra / total:.3f} | largest "
                  f"{'tensor' if name == 'hf2ma' else 'output shard'} {unit / MB:.1f} MiB, largest HF file "
                  f"{largest_file / MB:.1f} MiB -> increase/largest file {extra / largest_file:.2f}")


def report(name, r, unit_name, unit, total, largest_file):
    peak = r["rss_peak_during"]
    extra = peak - r["rss_before"]
    print(f"{name}: RSS {r['rss_before'] / MB:.1f} MiB before, peak {peak / MB:.1f} MiB during "
          f"(+{extra / MB:.1f}; sampled every 2 ms) in {r['seconds']:.1f} s | model {total / MB:.1f} MiB -> "
          f"increase/model {extra / total:.3f} | largest {unit_name} {unit / MB:.1f} MiB, largest HF file "
          f"{largest_file / MB:.1f} MiB -> increase/largest file {extra / largest_file:.2f}")


def main_v4(a):
    with tempfile.TemporaryDirectory(prefix="convert_mem_v4_") as tmp:
        t = time.time()
        src = os.path.join(tmp, "release")
        stored, largest_file, nfiles, bf16 = make_v4(src, a.hidden, a.layers, a.experts, a.shard_mb * MB)
        print(f"V4 release dir: {stored / MB:.1f} MiB stored (FP8 / FP4 + e8m0 scales) in {nfiles} files (largest "
              f"{largest_file / MB:.1f} MiB), {bf16 / MB:.1f} MiB dequantised; written in {time.time() - t:.1f} s")
        base = child("none")["peak_rss"]
        print(f"process peak RSS after imports only: {base / MB:.1f} MiB (the import high-water mark)")
        r = child("hf2hf", src, os.path.join(tmp, "hf"), a.shard_mb * MB)
        report("hf2hf (original FP8/FP4 -> hf bf16)", r, "output shard", r["largest_shard_bytes"], bf16, largest_file)
        r1 = child("hf2ma", src, os.path.join(tmp, "ma"), a.workers, may_fail=True)
        if "error" in r1:
            print(f"hf2ma / ma2hf: not run, this tree's model does not convert V4 yet ({r1['error'][:200]})")
            return
        report("hf2ma (original FP8/FP4 -> ours)", r1, "tensor", r1.get("largest_tensor_bytes", 0), bf16, largest_file)
        r2 = child("ma2hf", os.path.join(tmp, "ma"), os.path.join(tmp, "back"), a.shard_mb * MB)
        report("ma2hf", r2, "output shard", r2.get("largest_shard_bytes", 0), bf16, largest_file)


if __name__ == "__main__":
    main()
