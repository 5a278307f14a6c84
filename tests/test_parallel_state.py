"""Rank layout: pure-Python generator vs an independent numpy formulation, the documented example,
and the live groups built on gloo ranks."""
import itertools

import numpy as np
import pytest

from harness import run_distributed
from megatron_ascend.config import ConfigError, ParallelConfig
from megatron_ascend.parallel_state import RankLayout


def _np_groups(world, sizes_slow_to_fast, axes):
    """Independent reference: reshape ranks to the grid (slowest axis first) and read off groups along `axes`."""
    names = list(sizes_slow_to_fast)
    grid = np.arange(world).reshape([sizes_slow_to_fast[n] for n in names])
    keep = [names.index(a) for a in axes]
    other = [i for i in range(len(names)) if i not in keep]
    # groups vary along `keep` (fastest of them fastest) and agree on the others
    perm = other + sorted(keep, reverse=True)
    moved = grid.transpose(perm)
    n_other = int(np.prod([grid.shape[i] for i in other])) if other else 1
    flat = moved.reshape(n_other, -1)
    groups = [sorted(row.tolist()) for row in flat]
    return sorted(groups)


def _all_configs(world):
    for tp, pp in itertools.product([1, 2, 4, 8], repeat=2):
        if world % (tp * pp):
            continue
        dp = world // (tp * pp)
        for ep in [1, 2, 4, 8]:
            for etp in sorted({1, tp}):
                if (tp * dp) % (ep * etp):
                    continue
                yield ParallelConfig(world_size=world, tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_layout_matches_numpy_reference_for_every_fitting_mix(world):
    configs = list(_all_configs(world))
    assert configs
    for c in configs:
        lay = RankLayout(c)
        dense = {"pp": c.pp, "dp": c.dp, "cp": c.cp, "tp": c.tp}
        expert = {"pp": c.pp, "edp": c.edp, "ep": c.ep, "etp": c.etp}
        assert sorted(lay.tp) == _np_groups(world, dense, ["tp"]), c
        assert sorted(lay.dp) == _np_groups(world, dense, ["dp"]), c
        assert sorted(lay.pp) == _np_groups(world, dense, ["pp"]), c
        assert sorted(lay.mp) == _np_groups(world, dense, ["tp", "pp"]), c
        assert sorted(lay.tp_dp_cp) == _np_groups(world, dense, ["tp", "dp", "cp"]), c
        assert sorted(lay.ep) == _np_groups(world, expert, ["ep"]), c
        assert sorted(lay.etp) == _np_groups(world, expert, ["etp"]), c
        assert sorted(lay.edp) == _np_groups(world, expert, ["edp"]), c
        assert sorted(lay._expert("pp")) == sorted(lay.pp), c
        # every rank appears exactly once per group kind
        for name, groups in lay.all_groups().items():
            if name == "embedding":  # first and last stage of each pipeline only
                assert groups == [sorted({g[0], g[-1]}) for g in lay.pp], c
                continue
            assert sorted(r for g in groups for r in g) == list(range(world)), (name, c)


def test_documented_example_world8_tp2_pp2_ep2():
    lay = RankLayout(ParallelConfig(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                    expert_model_parallel_size=2))
    assert lay.tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.dp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.pp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.embedding == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.ep == lay.dp
    assert lay.edp == [[r] for r in range(8)]
    lay1 = RankLayout(ParallelConfig(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                     expert_model_parallel_size=2, expert_tensor_parallel_size=1))
    assert lay1.ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay1.edp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert RankLayout(ParallelConfig(world_size=4, pipeline_model_parallel_size=1)).embedding == [[0], [1], [2], [3]]


def test_show_layout_tool_prints_the_groups(capsys):
    import importlib.util, os
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "show_layout.py")
    spec = importlib.util.spec_from_file_location("show_layout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--world-size", "8", "--tensor-model-parallel-size", "2",
                     "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tp         {0,1} {2,3} {4,5} {6,7}" in out
    assert "dp         {0,2} {1,3} {4,6} {5,7}" in out
    assert "pp         {0,4} {1,5} {2,6} {3,7}" in out
    assert "ep         {0,2} {1,3} {4,6} {5,7}" in out


def _live_groups(configs):
    """Body on each rank: build the groups for every config and check them with collectives too."""
    import torch
    import torch.distributed as dist
    from megatron_ascend.parallel_state import initialize_model_parallel
    out = []
    for c in configs:
        pg = initialize_model_parallel(c)
        rec = {name: pg.ranks[name] for name in pg.ranks}
        # the group handle really contains those ranks: all-reduce each rank's id over it
        for name in ("tp", "dp", "pp", "ep", "edp", "etp", "embedding", "tp_dp_cp"):
            if pg.groups[name] is None:  # middle pipeline stages are in no embedding group
                continue
            t = torch.tensor([float(pg.rank)])
            dist.all_reduce(t, group=pg.groups[name])
            rec[name + "_sum"] = t.item()
        out.append(rec)
    return out


def test_live_groups_equal_layout_on_8_ranks():
    configs = [ParallelConfig(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              expert_model_parallel_size=2),
               ParallelConfig(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              expert_model_parallel_size=2, expert_tensor_parallel_size=1),
               ParallelConfig(world_size=8, tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                              expert_model_parallel_size=4),
               ParallelConfig(world_size=8, expert_model_parallel_size=8)]
    results = run_distributed(8, _live_groups, configs, timeout=240)
    for ci, c in enumerate(configs):
        lay = RankLayout(c).all_groups()
        for rank, recs in enumerate(results):
            rec = recs[ci]
            for name, groups in lay.items():
                mine = [g for g in groups if rank in g] or [[]]
                assert len(mine) == 1 and rec[name] == mine[0], (c, rank, name)
                if name + "_sum" in rec:
                    assert rec[name + "_sum"] == float(sum(mine[0])), (c, rank, name)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_live_groups_small_worlds(world):
    configs = list(_all_configs(world))
    results = run_distributed(world, _live_groups, configs, timeout=240)
    for ci, c in enumerate(configs):
        lay = RankLayout(c).all_groups()
        for rank, recs in enumerate(results):
            for name, groups in lay.items():
                assert recs[ci][name] == ([g for g in groups if rank in g] or [[]])[0]
