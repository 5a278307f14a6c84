#!/usr/bin/env python
"""Communication-volume conformance: bytes counted on real training steps vs the planner's analytic formulas.

    python bench/comm_volume.py            # 4 gloo ranks, two layouts, prints measured / analytic per category

Each layout runs one warm-up step and one counted step (megatron_ascend.comm_counter) of a tiny DeepSeek-V3
(MLA + MoE + MTP) through the real trainer, and compares every (group, op) with
megatron_ascend.planner.comm.rank_step_volume. Expert all-to-all rows depend on routing per rank, so ep is
compared summed over the ranks (exact: dropless routing sends every token top-k times). Bucket padding of the
distributed optimizer is read from the live buffers. Scalars (loss, token counts, grad norm, expert loads)
are listed as "small" and not modelled. Not a test; tests/test_comm_volume.py asserts the same equalities.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the tiny model and the modelled groups of the conformance test (tests/test_comm_volume.py), shared
from tests.test_comm_volume import MODELLED, TINY  # noqa: E402

LAYOUTS = {
    "TP2 SP EP2 ETP1 DP2 distopt": "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
                                   "--expert-tensor-parallel-size 1 --use-distributed-optimizer",
    "TP2 EP2 ETP1 DP2 (no SP)": "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
                                "--expert-tensor-parallel-size 1",
    "PP2 EP2 DP2": "--pipeline-model-parallel-size 2 --decoder-last-pipeline-num-layers 1 "
                   "--expert-model-parallel-size 2",
    "DP4 EP4 distopt": "--expert-model-parallel-size 4 --use-distributed-optimizer",
}
SMALL = 1024  # bytes: an unmodelled collective below this per step is a scalar / count (loss, tokens, loads)


def measure_and_predict(extra: str):
    """Run in every rank: one warm-up step, one counted step; returns (measured, analytic, param check)."""
    from megatron_ascend.comm_counter import CommCounter
    from megatron_ascend.planner.comm import rank_step_volume
    from megatron_ascend.planner.live import live_inputs
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    tr = Trainer(parse((TINY + extra).split(), "pretrain"), print_fn=lambda s: None)
    try:
        tr.train_step()
        with CommCounter(tr.groups) as cc:
            tr.train_step()
        li = live_inputs(tr)
        analytic = rank_step_volume(tr.model_cfg, li.layout, li.split, tr.groups.pp_rank, li.count,
                                    li.comm_options(tr.train_cfg.seq_length, tr.num_micro))
        return (dict(cc.bytes), dict(cc.calls), analytic,
                (li.live_dense, li.live_expert, li.count.dense, li.count.expert), sorted(cc.aliases))
    finally:
        tr.close()


def _modelled(name: str, op: str) -> bool:
    return op != "broadcast" and any(part in MODELLED for part in name.split("|"))


def _mapped(result):
    """Analytic volumes keyed like the measured ones: a handle shared by several group names (e.g. the world
    group serving dp, ep and tp_dp_cp at DP4 EP4) is reported once under the joined name."""
    meas, _, ana, _, _ = result
    alias = {}
    for name, _op in meas:
        for part in name.split("|"):
            alias[part] = name
    out = {}
    for (g, op), b in ana.items():
        key = (alias.get(g, g), op)
        out[key] = out.get(key, 0) + b
    return out


def compare(results):
    """Per (group, op): measured and analytic bytes (groups carrying ep summed over ranks, others per rank)."""
    rows = []
    mapped = [_mapped(r) for r in results]
    keys = set()
    for r, a in zip(results, mapped):
        keys |= {k for k in r[0] if _modelled(*k)} | set(a)
    for key in sorted(keys):
        if "ep" in key[0].split("|"):
            m, x = sum(r[0].get(key, 0) for r in results), sum(a.get(key, 0) for a in mapped)
            if x or m >= SMALL:
                rows.append((key, "sum", m, x))
        else:
            for rank, (r, a) in enumerate(zip(results, mapped)):
                m, x = r[0].get(key, 0), a.get(key, 0)
                if x or m >= SMALL:
                    rows.append((key, rank, m, x))
    return rows


def small(results):
    """Collectives the planner does not model (scalars, counts): max bytes per rank."""
    out = {}
    for r, a in zip(results, [_mapped(r) for r in results]):
        for k, b in r[0].items():
            if not _modelled(*k) or (not a.get(k) and b < SMALL):
                out[k] = max(out.get(k, 0), b)
    return out


def main():
    from tests.harness import run_distributed
    worst = 0.0
    for name, extra in LAYOUTS.items():
        res = run_distributed(4, measure_and_predict, extra, timeout=600)
        print(f"== {name} (4 ranks, seq 16, global batch 8, fp32)")
        for key, rank, m, a in compare(res):
            ratio = m / a if a else float("inf")
            worst = max(worst, abs(ratio - 1.0))
            print(f"  {key[0]:<10} {key[1]:<15} rank {rank!s:<4} measured {m:>10.0f}  analytic {a:>10.0f}  "
                  f"ratio {ratio:.4f}")
        print(f"  small (not modelled, max per rank): {small(res)}")
        print(f"  params per rank (live dense, live expert, planner dense, planner expert): "
              f"{[r[3] for r in res]}")
    print(f"worst |measured/analytic - 1| = {worst:.4f}")


if __name__ == "__main__":
    main()
