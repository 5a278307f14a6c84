"""MoELayer == transformers' DeepseekV3MoE / DeepseekV2Moe / DeepseekV4SparseMoeBlock (hash and learned
routing, sqrt-softplus, clamped SwiGLU) (outputs, input grads, every param grad) at
(TP, EP) in {(1,1), (1,2), (2,1), (2,2), (1,4), (1,8)} and more (expert-TP 1 and = TP, sequence parallel on
and off, both dispatchers), fp32. One spawned world per world size runs all of its layouts."""
from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from test_moe_common import (LAYER, V4_HASH_LAYER, V4_LAYER, build_hf, hf_to_ma, load_full, local_slice, model_cfg,
                             moe_terms, reduce_grad, setup_groups)
from tolerance import assert_close

B, S = 8, 6


def _run_case(kind, tp=1, ep=1, etp=None, sp=False, dispatcher="alltoall"):
    from megatron_ascend.moe import MoELayer
    par, pg = setup_groups(tp, ep, etp, sp, dispatcher)
    hc, hf = build_hf(kind)
    cfg = model_cfg(hc, aux_loss_alpha=0.0)
    inter = cfg.moe_intermediate_size
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    gy = torch.randn(B, S, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    layer_idx = {"v4hash": V4_HASH_LAYER, "v4": V4_LAYER}.get(kind, LAYER)
    xr = x.clone().requires_grad_()
    yr = hf(xr, ids) if kind.startswith("v4") else hf(xr)
    yr.backward(gy)
    ref = hf_to_ma({n: p.grad for n, p in hf.named_parameters()}, inter)

    layer = MoELayer(cfg, par, pg, layer_idx, init=False)
    load_full(layer, hf_to_ma(hf.state_dict(), inter))
    bl = B // pg.dp_size
    rows = slice(pg.dp_rank * bl, (pg.dp_rank + 1) * bl)

    def mine(t):  # [B, S, h] -> this rank's [s(/tp), b, h]
        t = t[rows].transpose(0, 1)
        if sp:
            t = t.chunk(tp, 0)[pg.tp_rank]
        return t.contiguous()

    xs = mine(x).requires_grad_()
    y = layer(xs, ids[rows])
    y.backward(mine(gy))
    name = f"{kind} tp{tp} ep{ep} etp{par.etp} sp{int(sp)} {dispatcher}"
    # the same math as transformers' block in other op orders (fp32): the layer's chain, B * S tokens
    terms = moe_terms(cfg, B * S)
    errs = {"out": assert_close(y, mine(yr), f"{name} rank {pg.rank} out", terms=terms),
            "dx": assert_close(xs.grad, mine(xr.grad), f"{name} rank {pg.rank} dx", terms=terms)}
    for n, p in layer.named_parameters():
        errs[n] = assert_close(reduce_grad(p, pg), local_slice(ref[n], p), f"{name} rank {pg.rank} grad {n}",
                               terms=terms)
    return name, errs


def _body(cases):
    return [_run_case(**c) for c in cases]


CASES = {
    1: [dict(kind="v3"), dict(kind="v2"), dict(kind="v3", dispatcher="allgather"), dict(kind="v4"),
        dict(kind="v4hash")],
    2: [dict(kind="v3", ep=2), dict(kind="v3", ep=2, dispatcher="allgather"), dict(kind="v3", tp=2),
        dict(kind="v3", tp=2, sp=True), dict(kind="v3", tp=2, sp=True, dispatcher="allgather"),
        dict(kind="v2", ep=2), dict(kind="v2", tp=2, sp=True), dict(kind="v3", tp=2, ep=2, etp=1),
        dict(kind="v4hash", tp=2), dict(kind="v4", ep=2)],
    4: [dict(kind="v3", tp=2, ep=2), dict(kind="v3", tp=2, ep=2, sp=True),
        dict(kind="v3", tp=2, ep=2, etp=1, sp=True), dict(kind="v3", tp=2, ep=2, etp=1, dispatcher="allgather"),
        dict(kind="v3", tp=2, ep=2, sp=True, dispatcher="allgather"),
        dict(kind="v3", ep=4), dict(kind="v3", ep=4, dispatcher="allgather"), dict(kind="v2", ep=4),
        dict(kind="v2", tp=2, ep=2, etp=1, sp=True), dict(kind="v4hash", tp=2, ep=2, etp=1, sp=True),
        dict(kind="v4", tp=2, ep=2, dispatcher="allgather")],
    8: [dict(kind="v3", ep=8), dict(kind="v3", ep=8, dispatcher="allgather"), dict(kind="v2", ep=8),
        dict(kind="v3", tp=2, ep=4, etp=1, sp=True), dict(kind="v3", tp=2, ep=2),
        dict(kind="v3", tp=4, ep=2, etp=1)],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_moe_layer_matches_transformers(world):
    results = run_distributed(world, _body, CASES[world], timeout=240)  # compared in the workers
    for rank, per_rank in enumerate(results):
        for name, errs in per_rank:
            assert len(errs) >= 6, f"rank {rank} [{name}]: only {sorted(errs)} compared"
    # every layout really ran on every rank
    assert all(len(r) == len(CASES[world]) for r in results)
