"""The trainer-level matrix (issue 21): every recompute, fusion, pipeline-layout, data-parallel and precision
setting a user's script selects, run through the entry point's own code path (``training.entry.parse`` +
``Trainer`` in-process on harness ranks) on a tiny DeepSeek-V3 with MTP, each row against the single-process
fp32 run without recompute.

Cost: one spawned world per world size; each world runs its rows one after another (a row is a fresh Trainer:
model, DDP, optimizer, 3 iterations, about 0.3 s for this model), so the price of a row is its training, not
a process start.

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


AUX0 = "--moe-aux-loss-coeff 0 --train-iters 1"  # the LM part of the router gradient at iteration 1
# fp16 at a loss scale the LM gradients do not overflow (the default 2**32 skips the first steps); the aux-loss
# gradient is divided by whatever scale it is unless the scale is folded into it
FP16 = "--fp16 --initial-loss-scale 4096"
PRECISION_ROWS = [("fp32 aux0", AUX0), ("fp16", FP16), ("fp16 aux0", f"{FP16} {AUX0}"),
                  ("bf16", "--bf16"), ("bf16 aux0", f"--bf16 {AUX0}")]

# world size -> rows (name, extra flags); the fp32 reference row "ref" runs in the world of 1
ROWS = {
    1: [("ref", "")] + _recompute_rows() + [("no fusion", NO_FUSION),
                                            ("no fusion + full uniform", f"{NO_FUSION} {FULL_UNIFORM}")]
       + [("all selective", "--recompute-granularity selective --recompute-modules " + " ".join(SELECTIVE))]
       + PRECISION_ROWS,
    2: [("dp2 distopt overlap + full uniform", f"--use-distributed-optimizer --overlap-grad-reduce {FULL_UNIFORM}"),
        ("dp2 distopt overlap + selective moe layernorm mla_up_proj",
         "--use-distributed-optimizer --overlap-grad-reduce --recompute-granularity selective "
         "--recompute-modules moe layernorm mla_up_proj"),
        ("dp2 ep2 + full block", f"--expert-model-parallel-size 2 {FULL_BLOCK}")],
}


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
        out[name] = {"lm": [res.losses[i]["lm loss"] for i in its],
                     "skipped": [res.grad_norms[i] is None for i in its], "router": router}
    return out


@pytest.fixture(scope="module")
def matrix():
    results = {}
    for world, rows in ROWS.items():
        per_rank = run_distributed(world, _run_rows, rows, timeout=600)
        for name in per_rank[0]:
            for r in per_rank[1:]:
                assert r[name]["lm"] == per_rank[0][name]["lm"], f"ranks disagree on the losses of row {name!r}"
            routers = {}
            for r in per_rank:
                routers.update(r[name]["router"])
            results[name] = dict(per_rank[0][name], router=routers)
    return results


def _fp32_rows():
    skip = {"ref"} | {name for name, _ in PRECISION_ROWS}
    return [name for rows in ROWS.values() for name, _ in rows if name not in skip]


@pytest.mark.parametrize("row", _fp32_rows())
def test_fp32_row_equals_single_process_reference(matrix, row):
    """Recompute (every mode), fusion off, DDP with overlap and the distributed optimizer: the same lm loss as
    the single-process run without recompute, for 3 iterations (fails before the fix of recompute x
    gradient-accumulation fusion with AttributeError main_grad in tensor_parallel/wgrad.py)."""
    import torch
    ref = torch.tensor(matrix["ref"]["lm"], dtype=torch.float64)
    got = torch.tensor(matrix[row]["lm"], dtype=torch.float64)
    assert_rel(got, ref, MODEL_REL, f"{row}: lm loss per iteration {got.tolist()} vs {ref.tolist()}")
    assert matrix["ref"]["lm"][0] != matrix["ref"]["lm"][2]  # the model trains: iterations differ


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_low_precision_row_aux_loss_gradient_equals_fp32(matrix, fmt):
    """Finite losses for 3 iterations, and the aux-loss gradient of each router (row minus its aux-coefficient-0
    twin, iteration 1) equal to the fp32 one within the format's rounding (fails before the loss scale was
    folded into the injected aux-loss gradient: under fp16 it came out divided by the loss scale, 4096 here)."""
    import math

    import torch

    from tests.tolerance import assert_close
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
    row, twin = matrix[fmt], matrix[f"{fmt} aux0"]
    assert len(row["lm"]) == 3 and all(math.isfinite(v) for v in row["lm"]), row["lm"]
    assert not row["skipped"][0] and not twin["skipped"][0]  # the probed step was a real one
    ref_full, ref_lm = matrix["ref"]["router"], matrix["fp32 aux0"]["router"]
    assert sorted(ref_full) == sorted(row["router"]) == [1, 2, 3]  # 2 MoE decoder layers + the MTP layer
    for layer in ref_full:
        ref = torch.tensor(ref_full[layer]) - torch.tensor(ref_lm[layer])
        got = torch.tensor(row["router"][layer]) - torch.tensor(twin["router"][layer])
        assert float(ref.abs().max()) > 0
        # the router's GEMM sums over the 64 tokens of the global batch; its input comes out of layers computed
        # in the low-precision format
        assert_close(got, ref, f"{fmt} router {layer} aux-loss gradient", terms=64, dtype=dtype)
