"""Soak: a 2,000-step tiny training run (the real trainer, one process) whose resident memory and step time
must stay flat. Prints the least-squares slopes over the steady part of the run (after --warmup steps) and over
its second half, and the medians of the first and last quarter, so a leak (memory growing a little every step, a list that grows,
a cache that is never trimmed) or a slowdown shows as a slope well above the noise.

    python bench/soak.py [--iters 2000] [--warmup 200] [--save-interval 500] [--json out.json]

The run uses the MoE model with MTP and aux-loss-free routing, evaluation and checkpoints every
--save-interval iterations (saves verified by their SHA-256 at the next start), the NaN checks (default on)
and the hang watchdog (a generous limit), so their per-step bookkeeping is soaked too. RSS is read from
/proc/self/statm after every step; the step time is the trainer's own train_step.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MEGATRON_ASCEND_DEVICE", "cpu")

TINY = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --q-lora-rank 32 "
        "--kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --num-experts 8 "
        "--moe-ffn-hidden-size 32 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-router-bias-update-rate 1e-3 "
        "--mtp-num-layers 1 --vocab-size 256 --make-vocab-size-divisible-by 1 --max-position-embeddings 128 "
        "--seq-length 64 --micro-batch-size 2 --global-batch-size 4 --mock-data --lr 1e-3 --lr-warmup-iters 10 "
        "--eval-iters 1 --seed 11 --watchdog-timeout-minutes 10")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--save-interval", type=int, default=500)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer

    work = tempfile.mkdtemp(prefix="soak_")
    argv = TINY.split() + ["--train-iters", str(a.iters), "--log-interval", str(a.iters), "--eval-interval",
                           str(a.save_interval), "--save-interval", str(a.save_interval), "--save", work,
                           "--save-retain", "2"]
    tr = Trainer(parse(argv, "pretrain"), print_fn=lambda s: None)
    times, rss = [], []
    step = tr.train_step

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        rss.append(rss_bytes())
        return out
    tr.train_step = timed_step
    t0 = time.time()
    res = tr.train()
    tr.close()
    wall = time.time() - t0
    w = min(a.warmup, len(times) // 4)
    xs = list(range(w, len(times)))
    ms = [t * 1e3 for t in times[w:]]
    mib = [r / 2 ** 20 for r in rss[w:]]
    q = max(len(xs) // 4, 1)
    out = {
        "iterations": len(times), "wall_s": wall, "saves": res.saved,
        "rss_slope_mib_per_1000_steps": slope(xs, mib) * 1000,
        "step_ms_slope_per_1000_steps": slope(xs, ms) * 1000,
        "rss_mib_first_quarter_median": statistics.median(mib[:q]),
        "rss_mib_last_quarter_median": statistics.median(mib[-q:]),
        "step_ms_first_quarter_median": statistics.median(ms[:q]),
        "step_ms_last_quarter_median": statistics.median(ms[-q:]),
        "rss_slope_second_half_mib_per_1000_steps": slope(xs[len(xs) // 2:], mib[len(mib) // 2:]) * 1000,
        "step_ms_slope_second_half_per_1000_steps": slope(xs[len(xs) // 2:], ms[len(ms) // 2:]) * 1000,
        "rss_mib_max": max(mib), "loss_first": res.losses[1]["lm loss"], "loss_last": res.losses[len(times)]["lm loss"],
        "nan_events": len(res.nan_events),
    }
    print(f"soak: {out['iterations']} steps in {wall:.0f} s (saves at {res.saved}); lm loss "
          f"{out['loss_first']:.3f} -> {out['loss_last']:.3f}")
    print(f"resident memory: slope {out['rss_slope_mib_per_1000_steps']:+.3f} MiB per 1000 steps over steps "
          f"{w}..{len(times)}; median {out['rss_mib_first_quarter_median']:.1f} MiB (first quarter) -> "
          f"{out['rss_mib_last_quarter_median']:.1f} MiB (last quarter); max {out['rss_mib_max']:.1f} MiB")
    print(f"second half (steps {xs[len(xs) // 2]}..{len(times)}): resident memory slope "
          f"{out['rss_slope_second_half_mib_per_1000_steps']:+.3f} MiB per 1000 steps, step time slope "
          f"{out['step_ms_slope_second_half_per_1000_steps']:+.3f} ms per 1000 steps")
    print(f"step time: slope {out['step_ms_slope_per_1000_steps']:+.3f} ms per 1000 steps; median "
          f"{out['step_ms_first_quarter_median']:.2f} ms (first quarter) -> {out['step_ms_last_quarter_median']:.2f} "
          f"ms (last quarter)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(out, step_ms=ms, rss_mib=mib, first_step=w), f, indent=1)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
