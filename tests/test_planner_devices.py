"""The device table (platform/devices.py) and what reads it: plan.py --device / figure flags / presets, the
trainer's MFU peak; plan.py's exit status; the planner's dualpipev and per-stage layer counts; the validation
against published runs (and that docs/PLANNER.md carries its current output)."""
import dataclasses
import os

import pytest

from megatron_ascend.config import ConfigError, ModelConfig
from megatron_ascend.planner import presets
from megatron_ascend.planner.comm import CommOptions, rank_step_volume
from megatron_ascend.planner.enumerate import evaluate
from megatron_ascend.planner.layout import Cluster, Layout, format_layer_counts, parse_layer_counts
from megatron_ascend.planner.params import rank_params, stage_split, total_params
from megatron_ascend.planner import validation
from megatron_ascend.platform.devices import DEVICES, device_spec, find_device
from tools import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=7,
            first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1)
REQUIRED = {"Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4", "Ascend910C", "H100", "H200", "H800", "H20",
            "A100", "A800", "B200", "GB200"}


def test_every_entry_has_a_value_a_grade_and_a_source():
    assert REQUIRED <= set(DEVICES)
    for d in DEVICES.values():
        figs = d.figures()
        assert set(figs) == set(Cluster.FIGURES)
        for k, f in figs.items():
            assert f.value > 0, (d.name, k)
            assert f.grade in ("H", "M", "L"), (d.name, k)
            # a source names a document, section or URL (not a bare word)
            assert len(f.source) > 30 and any(c in f.source for c in "§/:."), (d.name, k, f.source)
        assert float(figs["devices_per_node"].value).is_integer()
    # the 910C is a die: two dies make the package the vendor quotes (752 TFLOP/s, 128 GB)
    c = DEVICES["Ascend910C"]
    assert (c.tflops.value * 2, c.hbm_gib.value * 2, c.devices_per_node.value) == (752, 128, 16)


def test_lookup_by_runtime_names_and_unknown_device_error():
    assert find_device("NVIDIA H100 80GB HBM3").name == "H100"
    assert find_device("NVIDIA GB200").name == "GB200"  # not B200
    assert find_device("NVIDIA H200").name == "H200"  # not H20
    assert find_device("h20").name == "H20"
    for alias in DEVICES["Ascend910C"].aliases:
        assert device_spec(alias) is DEVICES["Ascend910C"]
    assert find_device("cpu") is None
    with pytest.raises(ConfigError, match="'TPUv9' is not in the device table.*Ascend910C.*GB200"):
        device_spec("TPUv9")


def test_mfu_peak_reads_the_table(monkeypatch):
    import types
    from megatron_ascend import platform
    from megatron_ascend.monitoring.throughput import resolve_peak_tflops
    names = (("Ascend910_9391", "Ascend910C"), ("NVIDIA H800", "H800"), ("Ascend910B4", "Ascend910B4"))
    for runtime_name, entry in names:
        monkeypatch.setattr(platform, "get_platform", lambda n=runtime_name: types.SimpleNamespace(kind="npu",
                                                                                                  device_name=n))
        assert resolve_peak_tflops(None) == DEVICES[entry].tflops.value
        assert resolve_peak_tflops(123.0) == 123.0
    assert platform.PEAK_TFLOPS_BF16["Ascend910_9392"] == DEVICES["Ascend910C"].tflops.value


def _args(*argv):
    return plan.build_parser().parse_args(list(argv))


def test_device_flag_fills_every_figure_and_a_flag_replaces_one():
    for name, spec in DEVICES.items():
        cl = plan.build_cluster(_args("--device", name, "--num-devices", "64"), None)
        assert {k: getattr(cl, k) for k in Cluster.FIGURES} == spec.values()
        assert (cl.name, cl.num_devices, cl.overrides) == (name, 64, ())
    cl = plan.build_cluster(_args("--device", "H800", "--num-devices", "64", "--hbm-gib", "96"), None)
    want = {**DEVICES["H800"].values(), "hbm_gib": 96.0}
    assert {k: getattr(cl, k) for k in Cluster.FIGURES} == want and cl.overrides == ("hbm_gib",)
    # a preset's cluster with one flag: the rest stays the preset's (= the table's)
    ps = presets.preset("v4pro-1024-910c")
    cl = plan.build_cluster(_args("--preset", "v4pro-1024-910c", "--inter-node-gbps", "196"), ps)
    assert cl == dataclasses.replace(ps.cluster, inter_node_gbps=196.0, overrides=("inter_node_gbps",))
    # no device and not every figure: one error naming what is missing
    with pytest.raises(ConfigError, match="missing --hbm-tbps --devices-per-node"):
        plan.build_cluster(_args("--tflops", "100", "--hbm-gib", "32", "--num-devices", "8"), None)
    with pytest.raises(ConfigError, match="hbm_gib = -1.0 must be positive"):
        plan.build_cluster(_args("--device", "H100", "--hbm-gib", "-1"), None)


def test_device_ascend910c_and_the_910c_preset_describe_the_same_device():
    ps = presets.preset("v4pro-1024-910c")
    by_flag = plan.build_cluster(_args("--device", "Ascend910C", "--num-devices", "1024"), None)
    assert by_flag == ps.cluster  # every field, name and num_devices included
    assert plan.build_cluster(_args("--preset", "v4pro-1024-910c", "--device", "Ascend910C"), ps) == ps.cluster
    h800 = presets.preset("v3-2048-h800")
    assert h800.cluster == Cluster.from_device("H800", 2048)


def test_plan_exit_status_no_fit_is_one_line_and_nonzero(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    import json
    json.dump(ModelConfig(**TINY).to_hf_dict(), open(cfg, "w"))
    common = ["--model-config", str(cfg), "--device", "H100", "--num-devices", "8", "--seq-length", "64",
              "--global-batch-size", "16", "--recompute", "full", "--top", "2"]
    assert plan.main(common) == 0
    capsys.readouterr()
    assert plan.main(common + ["--hbm-gib", "0.01"]) == 1
    out = capsys.readouterr()
    assert "0 fit in memory" in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no layout fits in 0.01 GiB per device")
    assert plan.main(common + ["--hbm-gib", "0.01", "--layout", "tp=2,pp=1,ep=2"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        plan.main(common[:4] + ["--device", "TPUv9"])
    assert e.value.code == 2 and "known devices: Ascend910B1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --validate runs its own layouts: a planning flag would be ignored
        plan.main(["--validate", "--device", "H100"])
    assert e.value.code == 2 and "ignore --device" in capsys.readouterr().err


def test_layer_counts_text_round_trip():
    counts = (1,) + (2,) * 30 + (0,)
    assert format_layer_counts(counts) == "1:2*30:0"
    assert parse_layer_counts("1:2*30:0") == counts
    with pytest.raises(ConfigError, match="N or N\\*repeat"):
        parse_layer_counts("1,2")


def test_explicit_layer_counts_interleaved_and_dualpipev_splits():
    cfg = ModelConfig(**TINY)  # 7 layers, MTP
    # interleaved pp 2 x vp 2: virtual stage k = v * pp + p; the last stage holds no decoder layer, only the head
    sp = stage_split(cfg, 2, 2, layer_counts=(1, 3, 3, 0))
    assert sp.layers == (((0,), (4, 5, 6)), ((1, 2, 3), ()))
    assert sp.head_chunk == (1, 1) and sp.is_last(1) and not sp.is_last(0)
    # dualpipev, pp 3: six stages in a V, rank p holds stages p and 5 - p; rank 0 both ends
    sv = stage_split(cfg, 3, 1, layer_counts=(2, 1, 1, 1, 1, 1), schedule="dualpipev")
    assert sv.layers == (((0, 1), (6,)), ((2,), (5,)), ((3,), (4,)))
    assert sv.head_rank == 0 and sv.head_chunk == (0, 1) and sv.is_first(0) and sv.is_last(0)
    for split in (sp, sv):  # every parameter on exactly one rank: no copy of the MTP embedding when ends meet
        counts = [rank_params(cfg, split, p, 1, 1, 1).total for p in range(split.pp)]
        extra = 0 if split is sv else 256 * 64  # 1f1b: MTP's own embedding copy on the last stage
        assert sum(counts) == total_params(cfg) + extra
    with pytest.raises(ConfigError, match="give 5 stages summing to 7 layers .* needs 6 stages"):
        stage_split(cfg, 3, 1, layer_counts=(2, 1, 1, 1, 2), schedule="dualpipev")
    with pytest.raises(ValueError, match="dualpipev needs"):
        Layout(pp=2, vp=2, schedule="dualpipev")


def test_dualpipev_time_memory_and_p2p():
    cfg = ModelConfig(**TINY)
    cl = Cluster.from_device("H800", 8)
    lay = Layout(pp=4, dp=2, ep=2, distributed_optimizer=True, schedule="dualpipev", layer_counts=(1,) * 7 + (0,))
    seq, gbs = 64, 32
    plan_v = evaluate(cfg, lay, cl, seq, gbs)
    m = gbs // 2
    units = (4 - 1) / 3.0  # (S/2 - 1)(F&B + B - 3W) with S = 8 stages of half a rank's time
    assert plan_v.time.bubble_fraction == pytest.approx(units / (m + units))
    assert plan_v.time.exposed["ep"] == 0.0  # fb-overlap hides the all-to-all
    assert plan_v.time.tokens_per_s_per_device == pytest.approx(gbs * seq / plan_v.time.step_s / 8)
    # p2p: 2 pp - 1 = 7 boundaries, one of them (stage 3 -> 4) inside rank 3: 6 cross ranks, each way, m times
    split = stage_split(cfg, 4, 1, layer_counts=lay.layer_counts, schedule="dualpipev")
    co = CommOptions(seq_length=seq, num_microbatches=m)
    sends = sum(rank_step_volume(cfg, lay, split, p, rank_params(cfg, split, p, 1, 2, 1), co).get(("pp", "send"), 0)
                for p in range(4))
    assert sends == pytest.approx(2 * 6 * m * (seq * cfg.hidden_size * 2 + 80))
    # memory: stage p holds 2pp - p micro-batches of chunk 0 and p + 1 of chunk 1 (in flight 2pp + 1 in total)
    assert all(s.inflight == pytest.approx(4.5) for s in plan_v.memory)
    one_f1b = evaluate(cfg, lay.replace(schedule="1f1b", layer_counts=None, first_stage_layers=1,
                                        last_stage_layers=2), cl, seq, gbs)
    assert plan_v.memory[0].activations > one_f1b.memory[0].activations  # rank 0 holds both ends of the V


@pytest.fixture(scope="module")
def rows():
    return validation.validate()


def test_validation_rows_and_the_v3_arithmetic(rows):
    assert validation.V3_IMPLIED == pytest.approx(14.8e12 / (2.664e6 * 3600)) == pytest.approx(1543.2, abs=0.05)
    runs = validation.published_runs()
    assert [r.key for r in runs] == ["deepseek-v3-h800", "megatron-bridge-h100", "mindspeed-a3"]
    assert [r.run.key for r in rows] == ["deepseek-v3-h800"] * 3 + ["megatron-bridge-h100", "mindspeed-a3"]
    for r in rows:
        got = r.plan.time.tokens_per_s_per_device
        assert [x for _, x in r.ratios()] == [got / v for _, v in r.run.published]
        assert r.plan.layout.world == r.run.num_devices
    ms = next(r for r in rows if r.run.key == "mindspeed-a3")
    assert ms.plan.layout.schedule == "dualpipev" and ms.cluster.inter_node_gbps == ms.cluster.intra_node_gbps
    mb = next(r for r in rows if r.run.key == "megatron-bridge-h100")
    assert mb.plan.layout.short().endswith("layers=1:2*30:0")


def test_planner_doc_carries_the_current_validation_and_device_tables(rows):
    doc = open(os.path.join(REPO, "docs", "PLANNER.md")).read()
    assert validation.format_validation(rows) in doc, \
        "docs/PLANNER.md is stale: paste `python tools/plan.py --validate` into its validation section"
    assert plan.list_devices() in doc, "docs/PLANNER.md is stale: paste `python tools/plan.py --list-devices`"
