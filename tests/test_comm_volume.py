"""Collective counter and the planner's communication / model-state formulas against real training steps.

One world of 4 gloo ranks runs (a) raw collectives of known sizes through the counter, (b) one counted step of a
tiny DeepSeek-V3 (MLA + MoE + MTP) through the real trainer at TP2+SP EP2 ETP1 DP2 with the distributed
optimizer, and (c) the same at PP2 EP2 DP2 without it. For each rank the planner's payload per (group, op) must
equal the counted bytes (ep summed over the ranks: routing is per rank, the total is exact), its per-rank
parameter split must equal the live tensors, and its model-state bytes must equal optimizer.memory's
measurement of the live tensors.
"""
import pytest
import torch

from tests.harness import run_distributed

TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc "
        "--mtp-num-layers 1 --vocab-size 128 --make-vocab-size-divisible-by 1 --max-position-embeddings 64 "
        "--seq-length 16 --micro-batch-size 1 --global-batch-size 8 --lr 3e-3 --train-iters 2 "
        "--log-interval 1 --mock-data --seed 7 ")
LAYOUTS = {
    "tp2_sp_ep2_distopt": "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
                          "--expert-tensor-parallel-size 1 --use-distributed-optimizer",
    "pp2_ep2": "--pipeline-model-parallel-size 2 --decoder-last-pipeline-num-layers 1 --expert-model-parallel-size 2",
}
MODELLED = ("tp", "ep", "pp", "dp_cp", "edp", "embedding")


def _raw_collectives():
    """Known-size collectives through every wrapped entry point; returns what the counter saw."""
    import torch.distributed as dist
    from megatron_ascend.comm_counter import CommCounter
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    g = initialize_model_parallel(ParallelConfig(world_size=4, tensor_model_parallel_size=2))
    rank = dist.get_rank()
    original = dist.all_reduce
    x = torch.ones(10)
    dist.all_reduce(x, group=g.tp)  # outside: not counted
    with CommCounter(g) as cc:
        dist.all_reduce(torch.ones(10), group=g.tp)  # 40 B
        dist.all_reduce(torch.ones(3, dtype=torch.float64))  # world, 24 B
        out = torch.empty(8)
        dist.all_gather_into_tensor(out, torch.ones(4), group=g.dp)  # 32 B (output)
        dist.all_gather([torch.empty(2), torch.empty(2)], torch.ones(2), group=g.tp)  # 16 B
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(6), group=g.tp)  # 24 B (input)
        dist.all_to_all_single(torch.empty(4), torch.ones(4), group=g.dp)  # 16 B
        dist.broadcast(torch.ones(5), src=0)  # world, 20 B
        peer = rank ^ 1  # tp partner
        ops = [dist.P2POp(dist.isend, torch.ones(6), peer, g.tp), dist.P2POp(dist.irecv, torch.empty(6), peer, g.tp)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()  # 24 B send + 24 B recv
        if rank % 2 == 0:
            dist.send(torch.ones(7), peer)
            dist.irecv(torch.empty(7), peer).wait()
        else:
            dist.recv(torch.empty(7), peer)
            dist.isend(torch.ones(7), peer).wait()
    restored = dist.all_reduce is original and dist.P2POp.__name__ == "P2POp" and \
        dist.batch_isend_irecv.__module__ != "megatron_ascend.comm_counter"
    return dict(cc.bytes), dict(cc.calls), restored, cc.group_name(None)


def _step(extra):
    from megatron_ascend.comm_counter import CommCounter
    from megatron_ascend.optimizer.memory import model_state_bytes as measured_states
    from megatron_ascend.planner.comm import rank_step_volume
    from megatron_ascend.planner.live import live_inputs
    from megatron_ascend.planner.memory import Precision, model_state_bytes
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    tr = Trainer(parse((TINY + extra).split(), "pretrain"), print_fn=lambda s: None)
    try:
        tr.train_step()
        with CommCounter(tr.groups) as cc:
            tr.train_step()
        par, li = tr.par, live_inputs(tr)
        analytic = rank_step_volume(tr.model_cfg, li.layout, li.split, tr.groups.pp_rank, li.count,
                                    li.comm_options(tr.train_cfg.seq_length, tr.num_micro))
        states = model_state_bytes(li.count, Precision.named("fp32"), par.dp, par.edp,
                                   par.use_distributed_optimizer, li.padding[False], li.padding[True])
        return dict(bytes=dict(cc.bytes), analytic=analytic, live=(li.live_dense, li.live_expert),
                    planned=(li.count.dense, li.count.expert),
                    measured_states=measured_states(tr.model_chunks, tr.optimizer), states=states.as_dict())
    finally:
        tr.close()


def _body():
    out = {"raw": _raw_collectives()}
    for name, extra in LAYOUTS.items():
        out[name] = _step(extra)
    return out


@pytest.fixture(scope="module")
def world():
    return run_distributed(4, _body, timeout=600)


def test_counter_counts_every_entry_point_and_restores(world):
    for rank, r in enumerate(world):
        b, calls, restored, w = r["raw"]  # w: the name(s) the world handle carries in ProcessGroups
        assert restored, "torch.distributed functions were not restored on exit"
        assert b[("tp", "all_reduce")] == 40 and calls[("tp", "all_reduce")] == 1  # the call outside is not counted
        assert b[(w, "all_reduce")] == 24
        assert b[("dp", "all_gather")] == 32
        assert b[("tp", "all_gather")] == 16
        assert b[("tp", "reduce_scatter")] == 24
        assert b[("dp", "all_to_all")] == 16
        assert b[(w, "broadcast")] == 20
        assert b[("tp", "send")] == 24 and b[("tp", "recv")] == 24  # batch_isend_irecv, counted once
        assert b[(w, "send")] == 28 and b[(w, "recv")] == 28  # send / recv / isend / irecv
        assert calls[(w, "send")] == 1 and calls[(w, "recv")] == 1


def _rows(world, name):
    keys = set()
    for r in world:
        keys |= {k for k in r[name]["bytes"] if k[0] in MODELLED and k[1] != "broadcast"} | set(r[name]["analytic"])
    rows = []
    for key in sorted(keys):
        if key[0] == "ep":
            rows.append((key, "sum", sum(r[name]["bytes"].get(key, 0) for r in world),
                         sum(r[name]["analytic"].get(key, 0) for r in world)))
        else:
            rows += [(key, i, r[name]["bytes"].get(key, 0), r[name]["analytic"].get(key, 0))
                     for i, r in enumerate(world)]
    return rows


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_volumes_equal_counted(world, name):
    rows = _rows(world, name)
    groups = {k[0] for k, *_ in rows}
    expected = {"tp", "ep", "dp_cp"} if name.startswith("tp2") else {"pp", "ep", "dp_cp", "embedding"}
    assert expected <= groups, groups
    bad = [(k, r, m, a) for k, r, m, a in rows if m != a]
    assert not bad, f"measured != analytic (key, rank, measured, analytic): {bad}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_params_and_model_states_equal_live(world, name):
    for r in world:
        res = r[name]
        assert res["live"] == res["planned"], (res["live"], res["planned"])
        m, p = res["measured_states"], res["states"]
        assert m["params"] == p["params"] and m["grads"] == p["grads"], (name, m, p)  # exact per rank
    # main params / Adam states: a rank's share depends on where bucket padding falls; the world's sum is exact
    for k_meas, k_plan in (("main_params", "main_params"), ("optimizer_states", "optimizer"), ("total", "total")):
        meas = sum(r[name]["measured_states"][k_meas] for r in world)
        plan = sum(r[name]["states"][k_plan] for r in world)
        assert abs(meas - plan) <= len(world), (name, k_meas, meas, plan)
