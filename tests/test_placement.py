"""Layer placement (megatron_ascend/placement.py): Megatron-Core's layout grammar, MindSpeed's --num-layer-list and
--noop-layers, interleaving; DeepSeek-V3's 61 layers + MTP at PP 8 x VP 2 and PP 16 by every source; the rules
as one ConfigError each, at start-up (validate_all). Pure Python; the trainer-level rows that train through
these placements are in tests/test_trainer_matrix.py."""
from __future__ import annotations

import pytest

from megatron_ascend.config import ConfigError
from megatron_ascend.placement import parse_layout, place

V3_LAYOUT = "Et*3|(tt|)*29,m|L"  # Megatron-Core's DeepSeek-V3 example: PP 16 x VP 2


def _check_complete(p, num_layers):
    """Every real layer exactly once, in model order; E first, L last; one MTP stage before or at the loss."""
    ids = [i for s in p.stages for i in s.layer_ids]
    assert ids == list(range(num_layers))
    assert p.stages[0].embedding and sum(s.embedding for s in p.stages) == 1
    assert p.stages[-1].loss and sum(s.loss for s in p.stages) == 1
    assert [s.index for s in p.stages] == list(range(p.pp * p.vp))
    for s in p.stages:
        assert (s.pp_rank, s.vp_rank) == (s.index % p.pp, s.index // p.pp)
    if p.mtp_layers:
        (m,) = [s for s in p.stages if s.mtp]
        assert all(not s.layer_ids for s in p.stages[m.index + 1:])
        assert p.loss_stage.mtp_in_input == (m is not p.loss_stage)


def test_layout_grammar():
    assert parse_layout("Et*2|(tt|)*2,mL") == ["Ett", "tt", "tt", "mL"]
    assert parse_layout(" E t | t , L ") == ["Et", "tL"]
    assert parse_layout("((t|)*2E)*2") == ["t", "t", "Et", "t", "E"]  # groups nest
    stages = parse_layout(V3_LAYOUT)
    assert len(stages) == 32 and stages[0] == "Ettt" and stages[1:30] == ["tt"] * 29 and stages[30:] == ["m", "L"]
    for bad, msg in [("Etx|L", "unknown character 'x'"), ("(Et|L", "never closed"), ("Et)|L", "closes nothing"),
                     ("", "empty")]:
        with pytest.raises(ConfigError, match=msg):
            parse_layout(bad)


def test_deepseek_v3_61_layers_with_mtp_place_at_pp8_vp2_and_pp16():
    # Megatron-Core's layout: MTP alone on pp rank 14 (vp 1), the head + loss alone on pp rank 15
    p = place(61, 16, mtp_layers=1, layout=V3_LAYOUT)
    _check_complete(p, 61)
    assert p.vp == 2 and p.chunks(0)[0].layer_ids == (0, 1, 2) and p.chunks(0)[1].layer_ids == (33, 34)
    assert p.mtp_stage.pp_rank == 14 and p.mtp_stage.vp_rank == 1 and not p.mtp_stage.layer_ids
    assert p.loss_pp_rank == 15 and p.loss_stage.mtp_in_input and not p.loss_stage.final_norm
    assert p.mtp_stage.final_norm and p.embedding_pp_ranks == (0, 14)
    # the same string at PP 8 is 8 x VP 4
    assert place(61, 8, mtp_layers=1, layout=V3_LAYOUT).vp == 4
    # MindSpeed-LLM's way: 64 slots with 3 noop layers, split evenly (PP 8 x VP 2 and PP 16)
    for pp, vp in [(8, 2), (16, 1)]:
        p = place(61, pp, vp, mtp_layers=1, noop_layers=(61, 62, 63))
        _check_complete(p, 61)
        assert all(len(s.layer_ids) + len(s.noop_slots) == 64 // (pp * vp) for s in p.stages)
        assert p.stages[-1].noop_slots == (61, 62, 63) and p.stages[-1].mtp and p.stages[-1].loss
        assert p.embedding_pp_ranks == (0, pp - 1) and p.loss_pp_rank == pp - 1
    # a noop slot in the middle (MindSpeed's DeepSeek-V3 conversion script: 47,62,63): real ids stay contiguous
    p = place(61, 8, 2, mtp_layers=1, noop_layers=(47, 62, 63))
    _check_complete(p, 61)
    assert p.stages[11].noop_slots == (47,) and p.stages[11].layer_ids == (44, 45, 46)
    assert p.stages[12].layer_ids == (47, 48, 49, 50)
    # --num-layer-list per pipeline stage (PP 16, no padding) and per virtual stage (PP 8 x VP 2)
    _check_complete(place(61, 16, mtp_layers=1, num_layer_list=[3] + [4] * 14 + [2]), 61)
    p = place(61, 8, 2, mtp_layers=1, num_layer_list=[2] + [4] * 14 + [3])
    _check_complete(p, 61)
    assert p.chunks(0)[0].layer_ids == (0, 1) and p.chunks(7)[1].layer_ids == (58, 59, 60)


def test_every_source_places_every_layer_once():
    cases = [dict(num_layers=3, pp=2, layout="Et|ttmL", mtp_layers=1),
             dict(num_layers=3, pp=2, layout="Et|t|t|mL", mtp_layers=1),
             dict(num_layers=3, pp=4, layout="Et|t|tm|L", mtp_layers=1),
             dict(num_layers=5, pp=2, layout="E|ttt|t|tL"),  # an embedding-only stage
             dict(num_layers=3, pp=2, vp=2, num_layer_list=[1, 1, 1, 0]),
             dict(num_layers=3, pp=2, vp=2, noop_layers=[3], mtp_layers=1),
             dict(num_layers=10, pp=4, first=1, last=3), dict(num_layers=16, pp=4, vp=2)]
    for c in cases:
        _check_complete(place(**c), c["num_layers"])
    p = place(3, 4, mtp_layers=1, layout="Et|t|tm|L")
    assert p.embedding_pp_ranks == (0, 2) and place(3, 4, layout="Et|t|t|L", tied=True).embedding_pp_ranks == (0, 3)
    assert "pp   2: 2,MTP" in p.format()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(layout="Et|tL"), "places 2 decoder layers"),
    (dict(layout="tE|ttL"), "stage 0 is 'tE'"),
    (dict(layout="t|EttL"), "embedding E must open the first stage"),
    (dict(layout="Ett|t|L|"), "loss L must close the last stage"),
    (dict(layout="Ett|t|L"), "3 stages, not a multiple of pipeline-model-parallel-size 2"),
    (dict(layout="Et|tm|t|mL", mtp_layers=2), r"stages \[1, 3\]; put all 2 in one stage"),
    (dict(layout="Et|m|tt|L", mtp_layers=1), "decoder layers after the MTP"),
    (dict(layout="Ettt|mmL", mtp_layers=1), "places 2 MTP layers"),
    (dict(layout="Ettt|L", mtp_layers=1), "places 0 MTP layers"),
    (dict(layout="Et|ttL", vp=2), "drop the virtual-pipeline flag"),
    (dict(layout="Et|ttL", noop_layers=[1]), "drop --noop-layers"),
    (dict(num_layer_list=[1, 1]), "sums to 2, not --num-layers 3"),
    (dict(num_layer_list=[1, 1, 1]), "3 entries"),
    (dict(num_layer_list=[2, 1], vp=2), "1 layers do not split over 2 virtual stages"),
    (dict(layout="Et|t|tm|L", mtp_layers=1), "two copies of the word embedding on pipeline rank 0"),
    (dict(noop_layers=[1, 1]), "lists a layer twice"),
    (dict(noop_layers=[9]), "outside the 4 layer slots"),
    (dict(), "num-layers 3 does not split"),
])
def test_placement_errors_name_the_value_and_the_fix(kwargs, msg):
    kw = dict(num_layers=3, pp=2)
    kw.update(kwargs)
    with pytest.raises(ConfigError, match=msg):
        place(**kw)


def _configs(extra, world):
    from megatron_ascend.arguments import build_configs, parse_args
    base = ("--num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
            "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
            "--moe-ffn-hidden-size 16 --moe-router-topk 2 --mtp-num-layers 1 --vocab-size 128 --seq-length 16 "
            "--max-position-embeddings 64 --micro-batch-size 1")
    return build_configs(parse_args((base + " " + extra).split()), world)


def test_flags_build_the_placement_and_fail_at_start_up():
    from megatron_ascend.placement import placement_of
    model, par, *_ = _configs("--pipeline-model-parallel-size 2 --noop-layers 3 --global-batch-size 2 "
                              "--num-layers-per-virtual-pipeline-stage 1", 2)
    assert model.num_hidden_layers == 3 and par.noop_layers == (3,)  # --num-layers counts the noop slot
    p = placement_of(model, par)
    assert p.vp == 2 and [s.layer_ids for s in p.stages] == [(0,), (1,), (2,), ()]
    model, par, *_ = _configs("--num-layers 5 --pipeline-model-parallel-size 2 "
                              "--pipeline-model-parallel-layout Et|tt|t|tmL --global-batch-size 2", 2)
    assert placement_of(model, par).vp == 2
    # interleaving with a micro-batch count that is not a multiple of PP: Megatron's group size makes it run
    _configs("--pipeline-model-parallel-size 2 --num-layer-list 1,1,1,1 --virtual-pipeline-model-parallel-size 2 "
             "--global-batch-size 3 --microbatch-group-size-per-virtual-pipeline-stage 3", 2)
    with pytest.raises(ConfigError, match="runs 3 micro-batches in groups of 2.*group-size-per-virtual-pipeline-stage 3"):
        _configs("--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --global-batch-size 3", 2)
    with pytest.raises(ConfigError, match="places 3 decoder layers"):
        _configs("--pipeline-model-parallel-size 2 --pipeline-model-parallel-layout Et|ttmL", 2)


def test_entry_point_prints_one_line_for_a_bad_layout(capsys):
    from megatron_ascend import pretrain
    rc = pretrain.main(["--num-layers", "3", "--pipeline-model-parallel-size", "1", "--train-iters", "1",
                        "--mock-data", "--vocab-size", "64", "--pipeline-model-parallel-layout", "Ett|L"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "places 2 decoder layers" in err[0]


def test_embedding_group_and_tool_follow_the_placement(capsys):
    import importlib.util
    import os

    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import RankLayout
    par = ParallelConfig(world_size=8, pipeline_model_parallel_size=4, tensor_model_parallel_size=2)
    assert RankLayout(par).embedding == [[0, 6], [1, 7]]  # default: first and last stage
    assert RankLayout(par, place(3, 4, mtp_layers=1, layout="Et|t|tm|L").embedding_pp_ranks).embedding == \
        [[0, 4], [1, 5]]  # the MTP stage (pp rank 2) holds the copy, not the loss stage
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "show_layout.py")
    spec = importlib.util.spec_from_file_location("show_layout", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--world-size", "4", "--pipeline-model-parallel-size", "4", "--num-layers", "3",
                      "--mtp-num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
                      "--pipeline-model-parallel-layout", "Et|t|tm|L"]) == 0
    out = capsys.readouterr().out
    assert "embedding  {0,2}" in out and "pp   2: 2,MTP" in out and "pp   3: L" in out
