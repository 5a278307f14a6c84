"""Monitoring: FLOPs formula (Megatron's numbers for DeepSeek-V3), TensorBoard names read back with
tensorboard's event reader, the log line, MoE imbalance, and the run report."""
import math
import os

import pytest

from megatron_ascend.config import ModelConfig
from megatron_ascend.monitoring import TensorBoardWriter, Throughput, TrainingLogger
from megatron_ascend.monitoring.flops import flops_breakdown, model_flops_per_token, _causal_keys
from megatron_ascend.monitoring.moe_stats import load_imbalance_scalars


def test_flops_deepseek_v3_matches_megatron_accounting():
    # Megatron's num_floating_point_operations for V3 at seq 4096 (performance_reliability_anchors A1):
    # 249.8 GFLOP/token without MTP, 260.0 with one MTP layer (Megatron-Bridge tables: 249.7 / 260.6).
    v3 = ModelConfig(num_nextn_predict_layers=0)
    assert model_flops_per_token(v3, 4096) / 1e9 == pytest.approx(249.812, abs=1e-3)
    v3m = ModelConfig(num_nextn_predict_layers=1)
    b = flops_breakdown(v3m, 4096)
    assert b["total"] / 1e9 == pytest.approx(259.993, abs=1e-3)
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
    assert b["head"] == pytest.approx(6 * 7168 * 129280 * 2)  # main head + MTP head


def test_flops_terms_by_hand_tiny():
    c = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=4,
                    qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4, n_shared_experts=1,
                    num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    s = 10
    h, n = 16, 2
    proj = 8 * (h + n * 6 + 1) + 4 * (h + n * 8 + 1) + h * 2 + n * 4 * h
    core = (s / 2) * n * 6 + (s / 2) * n * 4
    ffn = 3 * h * 32 + 3 * h * (2 * 8 + 8)
    expect = 6 * (2 * (proj + core) + ffn + h * 64)
    assert model_flops_per_token(c, s) == pytest.approx(expect)
    # a padded vocab is counted as padded
    assert model_flops_per_token(c, s, 128) - model_flops_per_token(c, s) == pytest.approx(6 * h * 64)
    # sliding-window / top-k mean keys: exact mean of min(t+1, w)
    assert _causal_keys(8, 3) == pytest.approx(sum(min(t + 1, 3) for t in range(8)) / 8)
    assert _causal_keys(8) == 4.0


def test_flops_v32_indexer_and_v4_run():
    v32 = ModelConfig(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
    v3 = ModelConfig()
    assert model_flops_per_token(v32, 4096) > 0
    # at seq <= topk the main attention is dense: V3.2 = V3 + indexer
    assert model_flops_per_token(v32, 2048) > model_flops_per_token(v3, 2048)
    v4 = ModelConfig(model_type="deepseek_v4", hidden_size=4096, num_attention_heads=64, head_dim=512,
                     q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, hc_mult=4,
                     n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048, first_k_dense_replace=0,
                     num_hidden_layers=43, num_nextn_predict_layers=1, index_n_heads=64, index_head_dim=128,
                     index_topk=512, qk_nope_head_dim=448, kv_lora_rank=512, v_head_dim=512,
                     compress_ratios=tuple([0, 0] + [4, 128] * 20 + [4] + [0]))
    f4 = model_flops_per_token(v4, 4096)
    assert 6 * 13e9 < f4 < 6 * 40e9  # ~13.8B active params (6N) plus attention


def test_moe_imbalance_scalars():
    out = load_imbalance_scalars({3: [4, 4, 4, 4], 5: [8, 0, 0, 0]})
    assert out["moe/tokens_per_expert_imbalance_layer_3"] == 1.0
    assert out["moe/tokens_per_expert_imbalance_layer_5"] == 4.0
    assert out["moe/tokens_per_expert_cv_layer_3"] == 0.0
    assert out["moe/tokens_per_expert_imbalance_max"] == 4.0


def test_throughput_mfu():
    t = Throughput(flops_per_token=1e9, world_size=4, peak_tflops=10.0)
    r = t.compute(tokens=8000, seconds=2.0)
    assert r["tokens_per_sec"] == 4000
    assert r["tflops_per_device"] == pytest.approx(1.0)
    assert r["mfu"] == pytest.approx(0.1)
    assert Throughput(1e9, 4, None).compute(1, 1)["mfu"] is None


def _read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _fake_run(path, offset=0.0, iters=6):
    w = TensorBoardWriter(path)
    lines = []
    log = TrainingLogger(w, train_iters=iters, log_interval=3, throughput=Throughput(1e6, 2, 1.0),
                         print_fn=lines.append)
    for it in range(1, iters + 1):
        log.record_iteration(it, it * 8, {"lm loss": 5.0 - 0.5 * it + offset, "mtp_1 loss": 6.0 - 0.5 * it,
                                          "load_balancing_loss": 0.01}, lr=1e-3 * it, global_batch_size=8,
                             grad_norm=1.5, skipped=(it == 2), tokens=8 * 16, seconds=0.5, num_zeros=0.0,
                             extra_scalars=load_imbalance_scalars({1: [it, 2, 3, 4]}))
    log.record_validation(iters, iters * 8, {"lm loss": 2.0 + offset})
    w.close()
    return lines, log


def test_tensorboard_names_and_log_line(tmp_path):
    lines, log = _fake_run(str(tmp_path))
    ev = _read_events(str(tmp_path))
    for name in ["lm loss", "learning-rate", "grad-norm", "iteration-time", "throughput", "mem-allocated-bytes",
                 "load_balancing_loss", "mtp_1 loss", "moe/tokens_per_expert_imbalance_layer_1",
                 "lm loss validation", "lm loss validation ppl", "mfu", "tokens-per-sec", "batch-size"]:
        assert name in ev, name
        assert f"{name} vs samples" in ev, name
    assert [s for s, _ in ev["lm loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in ev["lm loss vs samples"]] == [8, 16, 24, 32, 40, 48]
    assert ev["lm loss"][3][1] == pytest.approx(3.0)
    assert [s for s, _ in ev["grad-norm"]] == [1, 3, 4, 5, 6]  # skipped iteration 2 has no grad norm
    assert ev["lm loss validation ppl"][0][1] == pytest.approx(math.exp(2.0), rel=1e-6)
    assert [s for s, _ in ev["throughput"]] == [3, 6]
    # 3 iterations x 128 tokens / 1.5 s = 256 tok/s x 1e6 flop / 2 devices = 1.28e-4 TFLOP/s; MFU vs 1 TFLOP/s
    assert ev["throughput"][0][1] == pytest.approx(1.28e-4, rel=1e-5)
    assert ev["mfu"][0][1] == pytest.approx(1.28e-4, rel=1e-5)
    first = lines[0]
    assert "iteration        3/       6" in first and "consumed samples:" in first
    assert "lm loss: 4.000000E+00" in first  # mean of iterations 1 and 3 (4.5, 3.5; 2 was skipped)
    assert "number of skipped iterations:   1" in first and "MFU: 0.01%" in first
    assert "grad norm: 1.500" in first and "mtp_1 loss" in first and "load_balancing_loss" in first
    assert any("validation loss at iteration 6" in l for l in lines)
    assert log.total_skipped == 1


def test_disabled_writer_writes_nothing(tmp_path):
    w = TensorBoardWriter(str(tmp_path / "tb"), enabled=False)
    w.scalar("lm loss", 1.0, 1, 8)
    w.close()
    assert not os.path.exists(tmp_path / "tb")


def test_run_report_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import run_report
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a)
    _fake_run(b, offset=0.25)
    out = str(tmp_path / "report")
    assert run_report.main([a, b, "--labels", "npu", "gpu", "--out", out]) == 0
    s = run_report.build_report([a, b], out, ["npu", "gpu"])
    assert s["loss_difference"]["max_abs"] == pytest.approx(0.25, abs=1e-6)
    assert s["loss_difference"]["mean_abs"] == pytest.approx(0.25, abs=1e-6)
    assert s["runs"]["npu"]["lm loss validation last"] == pytest.approx(2.0)
    for png in ["loss.png", "throughput.png", "memory.png", "moe_0.png", "moe_1.png", "loss_diff.png"]:
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    page = open(os.path.join(out, "index.html")).read()
    assert "loss_diff.png" in page and "max |diff|" in page
    with pytest.raises(SystemExit):
        run_report.load_scalars(str(tmp_path / "missing"))
