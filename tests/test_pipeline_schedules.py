"""Pipeline schedules on gloo with the generic toy model: loss and every gradient at PP 2 / 4 (1F1B) and with
virtual stages equal the single-process model on the same data; the forward/backward order on every rank equals
the published 1F1B / interleaved orders; small microbatch counts do not hang; impossible sizes raise."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_ascend.config import ParallelConfig
from megatron_ascend.parallel_state import initialize_model_parallel
from megatron_ascend.pipeline_parallel import (PipelineScheduleError, ScheduleTrace, allreduce_embedding_grads,
                                               count_global_tokens, forward_backward_no_pipelining,
                                               get_forward_backward_func, sync_embedding_weights)
from tests.harness import run_distributed
from tests.tolerance import assert_close, assert_equal
from tests.test_pipeline_common import (H, build_chunks, make_batches, named_grads, published_1f1b_order,
                                        published_interleaved_order, toy_forward_step)


def _terms(L, microbatches):
    """The toy's longest chain of sums behind a gradient (tests/tolerance.py): per layer H + 2H forward and
    again backward, the head / MTP (V, 2H), and a weight gradient's sum over every token of every micro-batch
    (at most 2 x 7 each); the pipeline, dp all-reduce and embedding-group reduction only regroup these sums."""
    return 2 * (L * 3 * H + 23 + 2 * H) + 14 * microbatches


def _case(pg, L, vp, m, tie=False, mtp=False, dtype=torch.float64, fixed=None, forward_only=False,
          first=None, last=None, list_iter=False, seed=0, group=None):
    """Run one configuration on this rank, compare with the single-process model, return the trace order."""
    pp, dp = pg.pp_size, pg.dp_size
    tag = f"L{L} pp{pp} vp{vp} m{m} dp{dp} tie{tie} mtp{mtp} {dtype} fixed{fixed} fwd_only{forward_only}"
    data = make_batches(m * dp, seed=seed, fixed_len=fixed)
    mine = data[pg.dp_rank * m:(pg.dp_rank + 1) * m]

    ref = build_chunks(L, 1, 0, 1, tie, mtp, dtype)
    n_all = sum(b["loss_mask"].sum() for b in data)
    ref_losses = forward_backward_no_pipelining(toy_forward_step, iter(data), ref, m * dp, None,
                                                forward_only=forward_only, num_tokens=n_all)
    ref_grads = named_grads(ref)

    chunks = build_chunks(L, pp, pg.pp_rank, vp, tie, mtp, dtype, first, last)
    synced = sync_embedding_weights(chunks, pg)
    in_embedding_group = pg.is_first_stage or pg.is_last_stage
    assert synced == ((tie or mtp) and pp > 1 and in_embedding_group), tag
    ref_params = dict(ref[0].named_parameters())
    for c in chunks:  # initial weights equal the single-process ones (the embedding copy after the sync)
        for n, p in c.named_parameters():
            assert_equal(p.detach(), ref_params[n].detach(), f"{tag} initial {n}")
    ntok = count_global_tokens([b["loss_mask"] for b in mine], pg)
    assert_equal(ntok, n_all.to(ntok.dtype), f"{tag} global token count")  # integers: exact
    trace = ScheduleTrace()
    shape = dict(tensor_shape=(fixed, 2, H), dtype=dtype) if fixed else {}
    it = [iter(mine) for _ in range(vp)] if list_iter else iter(mine)
    fb = get_forward_backward_func(pp, vp, microbatch_group_size=group)
    losses = fb(toy_forward_step, it, chunks, m, pg, forward_only=forward_only,
                num_tokens=ntok if pg.is_last_stage else None, trace=trace, **shape)

    if pg.is_last_stage:
        assert len(losses) == m, tag
        for j, (got, want) in enumerate(zip(losses, ref_losses[pg.dp_rank * m:(pg.dp_rank + 1) * m])):
            assert got.keys() == want.keys(), tag
            for k in want:  # each micro-batch's forward is the same ops on the same values
                assert_equal(got[k], want[k], f"{tag} microbatch {j} {k}")
    else:
        assert losses == [], tag
    if not forward_only:
        allreduce_embedding_grads(chunks, pg)
        grads = named_grads(chunks)
        for n, g in grads.items():
            assert g is not None, f"{tag}: no grad for {n}"
            if dp > 1:
                dist.all_reduce(g, group=pg.dp)
            assert_close(g, ref_grads[n], f"{tag} grad {n}", terms=_terms(L, m * dp))
        mine_names = set(grads)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(mine_names))
        assert set().union(*map(set, everyone)) == set(ref_grads), f"{tag}: some parameters live on no stage"
    return trace.order()


def _expected(p, r, m, v, forward_only, group=None):
    if forward_only:
        if v == 1:
            return [("F", j, 0) for j in range(m)]
        return [e for e in published_interleaved_order(p, r, m, v, group) if e[0] == "F"]
    return published_1f1b_order(p, r, m) if v == 1 else published_interleaved_order(p, r, m, v, group)


def _check_order(pg, got, m, v, forward_only=False, group=None):
    want = _expected(pg.pp_size, pg.pp_rank, m, v, forward_only, group)
    assert got == want, f"pp{pg.pp_size} rank {pg.pp_rank} m{m} v{v}: order\n{got}\n!= published\n{want}"


def _world2_body():
    pg = initialize_model_parallel(ParallelConfig(world_size=2, pipeline_model_parallel_size=2))
    cases = [dict(L=4, vp=1, m=4), dict(L=4, vp=1, m=1), dict(L=4, vp=1, m=3, tie=True, mtp=True),
             dict(L=6, vp=1, m=5, first=1, last=5, mtp=True), dict(L=4, vp=1, m=4, dtype=torch.float32),
             dict(L=4, vp=1, m=3, fixed=5), dict(L=4, vp=1, m=3, forward_only=True),
             dict(L=8, vp=2, m=4, tie=True, mtp=True), dict(L=8, vp=2, m=2), dict(L=8, vp=2, m=6, list_iter=True),
             dict(L=6, vp=3, m=4, tie=True), dict(L=8, vp=2, m=4, fixed=6, dtype=torch.float32),
             dict(L=8, vp=2, m=4, forward_only=True, mtp=True),
             # micro-batch counts that are not a multiple of PP interleave in groups of N (Megatron's
             # microbatch_group_size_per_vp_stage): one group of 3, groups of 3 + 2, groups of 5
             dict(L=8, vp=2, m=3, group=3, tie=True, mtp=True), dict(L=8, vp=2, m=5, group=3),
             dict(L=6, vp=3, m=5, group=5, mtp=True), dict(L=8, vp=2, m=5, group=3, forward_only=True)]
    for case in cases:
        order = _case(pg, **case)
        _check_order(pg, order, case["m"], case["vp"], case.get("forward_only", False), case.get("group"))
    # sizes the interleaved schedule cannot run: every rank raises before any communication
    fb = get_forward_backward_func(2, 2)
    chunks = build_chunks(8, 2, pg.pp_rank, 2, False, False, torch.float64)
    with pytest.raises(PipelineScheduleError, match="runs 3 micro-batches in groups of 2.*group-size-per-virtual"):
        fb(toy_forward_step, iter(make_batches(3)), chunks, 3, pg, num_tokens=10.0)
    with pytest.raises(PipelineScheduleError, match="runs 7 micro-batches in groups of 3"):  # last group of 1
        get_forward_backward_func(2, 2, 3)(toy_forward_step, iter(make_batches(7)), chunks, 7, pg, num_tokens=10.0)
    with pytest.raises(PipelineScheduleError, match="runs 1 model chunk"):
        get_forward_backward_func(2, 1)(toy_forward_step, iter(make_batches(2)), chunks, 2, pg, num_tokens=1.0)
    # a copy of the embedding on the last stage that the first stage does not mark: both ranks get the error
    chunks = build_chunks(4, 2, pg.pp_rank, 1, True, False, torch.float64)
    if pg.is_first_stage:
        chunks[0].embed_tokens.shared_embedding = False
    with pytest.raises(ValueError, match="marks none"):
        sync_embedding_weights(chunks, pg)
    return True


def _world4_body():
    pg = initialize_model_parallel(ParallelConfig(world_size=4, pipeline_model_parallel_size=4))
    cases = [dict(L=4, vp=1, m=8), dict(L=4, vp=1, m=1), dict(L=4, vp=1, m=2, tie=True, mtp=True),
             dict(L=8, vp=1, m=3, first=1, last=3, tie=True), dict(L=8, vp=2, m=4, mtp=True),
             dict(L=8, vp=2, m=8, tie=True, mtp=True), dict(L=12, vp=3, m=4, dtype=torch.float32),
             dict(L=8, vp=2, m=6, group=6, tie=True, mtp=True), dict(L=8, vp=2, m=10, group=6)]
    for case in cases:
        _check_order(pg, _case(pg, **case), case["m"], case["vp"], group=case.get("group"))
    # PP 2 x DP 2: the token count is global over dp, grads summed over dp equal the single process
    pg = initialize_model_parallel(ParallelConfig(world_size=4, pipeline_model_parallel_size=2))
    for case in [dict(L=4, vp=1, m=3, mtp=True, seed=3), dict(L=8, vp=2, m=4, tie=True, mtp=True, seed=4)]:
        _check_order(pg, _case(pg, **case), case["m"], case["vp"])
    return True


def test_pp2_1f1b_and_interleaved_equal_single_process_and_published_orders():
    assert all(run_distributed(2, _world2_body, timeout=240))


def test_pp4_and_pp2_dp2_equal_single_process_and_published_orders():
    assert all(run_distributed(4, _world4_body, timeout=300))


def test_no_pipeline_accumulates_and_orders():
    ref = build_chunks(4, 1, 0, 1, True, True, torch.float64)
    trace = ScheduleTrace()
    data = make_batches(3)
    n = sum(b["loss_mask"].sum() for b in data)
    losses = forward_backward_no_pipelining(toy_forward_step, iter(data), ref, 3, None, num_tokens=n, trace=trace)
    assert trace.order() == [("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0), ("F", 2, 0), ("B", 2, 0)]
    # the accumulated grad is the grad of (sum of all token losses) / (all tokens): one big batch
    g_acc = named_grads(ref)
    for p in ref[0].parameters():
        p.grad = None
    total = 0
    for b in data:
        out, lf = toy_forward_step(iter([b]), ref[0])
        total = total + lf(out)[0]
    (total / n).backward()
    for k, g in named_grads(ref).items():  # per-micro-batch accumulation vs one backward of the sum
        assert_close(g_acc[k], g, f"accumulated grad {k}", terms=_terms(4, 3))
    assert [float(x["tokens"]) for x in losses] == [float(b["loss_mask"].sum()) for b in data]
    with pytest.raises(PipelineScheduleError, match="needs num_tokens"):
        forward_backward_no_pipelining(toy_forward_step, iter(data), ref, 3, None)
    with pytest.raises(PipelineScheduleError, match="virtual pipeline size 2 needs"):
        get_forward_backward_func(1, 2)
    with pytest.raises(PipelineScheduleError, match="list of model chunks"):
        forward_backward_no_pipelining(toy_forward_step, iter(data), ref[0], 3, None, num_tokens=n)
