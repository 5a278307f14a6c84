"""The trainer-level matrix (issue 21): every recompute, fusion, pipeline-layout, data-parallel and precision
setting a user's script selects, run through the entry point's own code path (``training.entry.parse`` +
``Trainer`` in-process on harness ranks) on a tiny DeepSeek-V3 with MTP, each row against the single-process
fp32 run without recompute.

Cost: one spawned world per world size; each world runs its rows one after another (a row is a fresh Trainer:
model, DDP, optimizer, 3 iterations, about 0.3 s for this model), so the price of a row is its training, not
a process start. One test per world size (so pytest-xdist spreads the worlds over its workers instead of each
worker running the whole matrix); the worlds of 2 and 4 first re-run the three single-process reference rows
(about 1 s). Each test checks all its rows and reports every failing row at once. Measured on the shared 2-core
machine: worlds 1 / 2 / 4 (20 / 15 / 7 rows) take about 16 / 21 / 16 s.

fp32 rows: the lm loss of each of the 3 iterations within 1e-5 relative of the reference (``assert_rel``).
fp16 / bf16 rows: finite losses, and the aux-loss gradient of every router at iteration 1 equal to the fp32
one within the format's rounding. The aux-loss part of a router's gradient is isolated by linearity: the same
row run with ``--moe-aux-loss-coeff 0`` (same weights, same routing at iteration 1) gives the LM part, and
the difference is the aux-loss part.
"""
from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_rel

# 3 decoder layers (1 dense + 2 MoE), MTP depth 1, noaux_tc sigmoid routing with a sequence-wise balance loss
# and the bias update; 4 micro-batches of 1 per iteration at DP 1
MODEL = ("--model-type deepseek_v3 --num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 "
         "--q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 "
         "--num-experts 4 --moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 "
         "--first-k-dense-replace 1 --moe-router-score-function sigmoid --moe-router-topk-method noaux_tc "
         "--moe-aux-loss-coeff 1e-2 --moe-router-bias-update-rate 1e-2 --mtp-num-layers 1 --vocab-size 128 "
         "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
         "--global-batch-size 4 --lr 3e-3 --train-iters 3 --eval-iters 0 --eval-interval 1000 "
         "--log-interval 1000 --mock-data --seed 3")
ITERS = (1, 2, 3)

FULL_UNIFORM = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
FULL_BLOCK = "--recompute-granularity full --recompute-method block --recompute-num-layers 2"
SELECTIVE = ("core_attn", "mla_up_proj", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
NO_FUSION = "--no-gradient-accumulation-fusion"


def _recompute_rows(prefix: str = ""):
    rows = [("full uniform", FULL_UNIFORM), ("full block", FULL_BLOCK)]
    rows += [(f"selective {m}", f"--recompute-granularity selective --recompute-modules {m}") for m in SELECTIVE]
    return [(name, f"{prefix} {flags}".strip()) for name, flags in rows]


PP2 = "--pipeline-model-parallel-size 2"
TP2_SP = "--tensor-model-parallel-size 2 --sequence-parallel"
LAYOUT_PP2 = "--pipeline-model-parallel-layout Et|ttmL"        # 3 layers on 2 stages
LAYOUT_VP2 = "--pipeline-model-parallel-layout Et|t|t|mL"      # 3 layers on 2 x 2 virtual stages
DISTOPT = "--use-distributed-optimizer --overlap-grad-reduce"
GBS3 = "--global-batch-size 3"
AUX0 = "--moe-aux-loss-coeff 0 --train-iters 1"  # the LM part of the router gradient at iteration 1
# fp16 at a loss scale the LM gradients do not overflow (the default 2**32 skips the first steps); the aux-loss
# gradient is divided by whatever scale it is unless the scale is folded into it
FP16 = "--fp16 --initial-loss-scale 4096"


def _twin(name, flags):
    """A low-precision row and its aux-coefficient-0 twin (one iteration)."""
    return [(name, flags), (f"{name} aux0", f"{flags} {AUX0}")]


# low-precision rows: (row, format); each has an "<row> aux0" twin, compared with "ref" - "fp32 aux0"
LOW_PRECISION = [("fp16", "fp16"), ("bf16", "bf16"), ("bf16 dp2", "bf16"), ("fp16 pp2 layout", "fp16"),
                 ("bf16 tp2 sp pp2 layout", "bf16")]

# world size -> rows (name, extra flags), run in this order in one spawned world per size; "ref" (single process,
# fp32, no recompute) is the reference of every fp32 row
ROWS = {
    1: [("ref", "")] + _recompute_rows() + [
        ("no fusion", NO_FUSION), ("no fusion + full uniform", f"{NO_FUSION} {FULL_UNIFORM}"),
        ("no fusion + selective moe layernorm", f"{NO_FUSION} --recompute-granularity selective "
                                                f"--recompute-modules moe layernorm"),
        ("all selective", "--recompute-granularity selective --recompute-modules " + " ".join(SELECTIVE)),
        ("fp32 aux0", AUX0), ("ref gbs3", GBS3)] + _twin("fp16", FP16) + _twin("bf16", "--bf16"),
    2: [("dp2 distopt overlap + full uniform", f"{DISTOPT} {FULL_UNIFORM}"),
        ("dp2 distopt overlap + selective moe layernorm mla_up_proj",
         f"{DISTOPT} --recompute-granularity selective --recompute-modules moe layernorm mla_up_proj"),
        ("dp2 ep2 + full block", f"--expert-model-parallel-size 2 {FULL_BLOCK}"),
        ("tp2 sp + selective layernorm mlp moe_act",
         f"{TP2_SP} --recompute-granularity selective --recompute-modules layernorm mlp moe_act"),
        ("tp2 sp ep2 etp1 no fusion + full block",
         f"{TP2_SP} --expert-model-parallel-size 2 --expert-tensor-parallel-size 1 {NO_FUSION} {FULL_BLOCK}"),
        # 3 layers (odd) placed by layout strings, MindSpeed's noop layers, interleaving with 3 micro-batches
        ("pp2 layout Et|ttmL", f"{PP2} {LAYOUT_PP2}"),
        ("pp2 layout + full uniform", f"{PP2} {LAYOUT_PP2} {FULL_UNIFORM}"),
        ("pp2 noop layer 1", f"{PP2} --num-layers 4 --noop-layers 1"),
        ("pp2 vp2 layout + selective core_attn mla_up_proj shared_experts, no fusion",
         f"{PP2} {LAYOUT_VP2} {NO_FUSION} --recompute-granularity selective "
         f"--recompute-modules core_attn mla_up_proj shared_experts"),
        ("pp2 vp2 layout + full uniform", f"{PP2} {LAYOUT_VP2} {FULL_UNIFORM}"),
        ("pp2 vp2 layout, 3 micro-batches", f"{PP2} {LAYOUT_VP2} {GBS3} "
                                            f"--microbatch-group-size-per-virtual-pipeline-stage 3")]
       + _twin("bf16 dp2", "--bf16") + _twin("fp16 pp2 layout", f"{FP16} {PP2} {LAYOUT_PP2}"),
    4: [("pp2 vp2 layout, dp2 distopt overlap", f"{PP2} {LAYOUT_VP2} {DISTOPT}"),
        ("pp2 vp2 layout, ep2 + full block", f"{PP2} {LAYOUT_VP2} --expert-model-parallel-size 2 {FULL_BLOCK}"),
        ("pp2 vp2 standalone MTP + an empty stage Et|ttm||L, dp2", f"{PP2} --pipeline-model-parallel-layout Et|ttm||L"),
        ("pp4 standalone MTP Et|t|tm|L", "--pipeline-model-parallel-size 4 --pipeline-model-parallel-layout Et|t|tm|L"),
        ("tp2 sp pp2 layout, distopt + full uniform", f"{TP2_SP} {PP2} {LAYOUT_PP2} {DISTOPT} {FULL_UNIFORM}")]
       + _twin("bf16 tp2 sp pp2 layout", f"--bf16 {TP2_SP} {PP2} {LAYOUT_PP2}"),
}
# single-process reference rows every world needs
REFERENCE_ROWS = [("ref", ""), ("fp32 aux0", AUX0), ("ref gbs3", GBS3)]
# rows whose reference is not "ref" (another global batch)
REFERENCE = {"pp2 vp2 layout, 3 micro-batches": "ref gbs3"}


def _probe_router_grads(tr):
    """Record each local router's gradient (fp32 main_grad, divided by the loss scale as the optimizer does)
    when the first optimizer step starts: after every reduction, before clipping. Only reads. Lists, not
    tensors, go back to the parent (a tensor's shared memory dies with the worker)."""
    from megatron_ascend.moe.router import TopKRouter
    from megatron_ascend.training import parts
    routers = {r.layer_idx: r for c in tr.model_chunks for r in parts.unwrap(c).modules()
               if isinstance(r, TopKRouter)}
    grads = {}
    step = tr.optimizer.step

    def probed(*a, **kw):
        if not grads:
            scale = parts.loss_scale(tr.optimizer) or 1.0
            grads.update({i: (r.weight.main_grad.double() / scale).tolist() for i, r in routers.items()})
        return step(*a, **kw)

    tr.optimizer.step = probed
    return grads


def _run_rows(rows):
    """Every row in turn on this world; returns {name: {'lm': [lm loss per iteration], 'skipped': [...],
    'router': {layer: grad at iteration 1}}}: losses are the same on every rank, router grads the local ones."""
    from megatron_ascend.training import parts
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    out = {}
    for name, extra in rows:
        tr = Trainer(parse(MODEL.split() + extra.split(), "pretrain"), print_fn=lambda s: None)
        router = _probe_router_grads(tr)
        try:
            res = tr.train()
        finally:
            tr.close()
        its = sorted(res.losses)
        names = sorted(n for c in tr.model_chunks for n, _ in parts.unwrap(c).named_parameters())
        out[name] = {"lm": [res.losses[i]["lm loss"] for i in its], "mtp": [res.losses[i]["mtp_1 loss"] for i in its],
                     "skipped": [res.grad_norms[i] is None for i in its], "router": router, "names": names,
                     "logging": tr.is_logging_rank, "holds_loss": tr.holds_loss}
    return out


def _world_results(world):
    """Run this world's rows (and, for worlds > 1, the single-process reference rows first); per row: the losses
    every rank agrees on, the router gradients of all ranks, the union of parameter names, one logging rank."""
    runs = [(world, ROWS[world])] if world == 1 else [(1, REFERENCE_ROWS), (world, ROWS[world])]
    results = {}
    for size, rows in runs:
        per_rank = run_distributed(size, _run_rows, rows, timeout=600)
        for name in per_rank[0]:
            for r in per_rank[1:]:
                assert r[name]["lm"] == per_rank[0][name]["lm"], f"ranks disagree on the losses of row {name!r}"
            routers = {}
            for r in per_rank:
                routers.update(r[name]["router"])
            logging = [i for i, r in enumerate(per_rank) if r[name]["logging"]]
            assert len(logging) == 1 and per_rank[logging[0]][name]["holds_loss"], \
                f"row {name!r}: one logging rank, on the stage that holds the loss (got ranks {logging})"
            results[name] = dict(per_rank[0][name], router=routers,
                                 names=sorted(set().union(*(r[name]["names"] for r in per_rank))))
    return results


def _check_fp32(results, row):
    """The same lm and MTP losses as the single-process fp32 run without recompute (3 iterations, 1e-5 relative),
    and every parameter somewhere under its single-process name (noop layers add none, layouts rename none)."""
    import torch
    ref_row = results[REFERENCE.get(row, "ref")]
    for key in ("lm", "mtp"):
        ref = torch.tensor(ref_row[key], dtype=torch.float64)
        got = torch.tensor(results[row][key], dtype=torch.float64)
        assert_rel(got, ref, MODEL_REL, f"{row}: {key} loss per iteration {got.tolist()} vs {ref.tolist()}")
    assert ref_row["lm"][0] != ref_row["lm"][2]  # the model trains: iterations differ
    assert results[row]["names"] == ref_row["names"], f"{row}: parameter names differ from the single process"


def _check_low_precision(results, row, fmt):
    """Finite losses for 3 iterations, and the aux-loss gradient of each router (row minus its aux-coefficient-0
    twin, iteration 1) equal to the fp32 one within the format's rounding."""
    import math

    import torch

    from tests.tolerance import assert_close
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
    got_row, twin = results[row], results[f"{row} aux0"]
    assert len(got_row["lm"]) == 3 and all(math.isfinite(v) for v in got_row["lm"]), f"{row}: {got_row['lm']}"
    assert not got_row["skipped"][0] and not twin["skipped"][0], f"{row}: the probed step was skipped"
    ref_full, ref_lm = results["ref"]["router"], results["fp32 aux0"]["router"]
    assert sorted(ref_full) == sorted(got_row["router"]) == [1, 2, 3]  # 2 MoE decoder layers + the MTP layer
    for layer in ref_full:
        ref = torch.tensor(ref_full[layer]) - torch.tensor(ref_lm[layer])
        got = torch.tensor(got_row["router"][layer]) - torch.tensor(twin["router"][layer])
        assert float(ref.abs().max()) > 0
        # the router's GEMM sums over the 64 tokens of the global batch; its input comes out of layers computed
        # in the low-precision format
        assert_close(got, ref, f"{row} router {layer} aux-loss gradient", terms=64, dtype=dtype)


@pytest.mark.parametrize("world", sorted(ROWS))
def test_trainer_matrix(world):
    """Every row of this world size: fp32 rows equal the single-process fp32 run without recompute (recompute
    full uniform / block and each selective module used to fail at the first backward with AttributeError
    main_grad under the default gradient-accumulation fusion); fp16 / bf16 rows keep the aux-loss gradient
    (under fp16 it used to come out divided by the loss scale); layouts, noop layers and interleaving with 3
    micro-batches used to be impossible."""
    results = _world_results(world)
    low = dict(LOW_PRECISION)
    skip = {name for name, _ in REFERENCE_ROWS} | {f"{r} aux0" for r in low}
    failures = []
    for name, _ in ROWS[world]:
        if name in skip:
            continue
        try:
            if name in low:
                _check_low_precision(results, name, low[name])
            else:
                _check_fp32(results, name)
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    assert not failures, f"{len(failures)} of {len(ROWS[world])} rows failed:\n" + "\n".join(failures)
