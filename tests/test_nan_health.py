"""NaN / Inf detection (training/health.py) through the trainer on 2 gloo ranks (EP2, distributed optimizer): a
NaN injected into the output of decoder layer 1 on rank 1 at iteration 3 (training/faults.py) is reported with
that iteration, rank and layer (--nan-trace-modules) and the parameters whose gradients went non-finite;
--nan-policy skip skips exactly that update (weights equal to a clean run that stopped before it) and goes on;
--nan-policy stop --nan-max-consecutive 2 stops at the second NaN step in a row, saves the last good state
(bitwise the weights of a clean run at that iteration) and exits with code 3 and one line. Loss spikes are
reported by factor. Before this change the skipped steps were silent."""
import contextlib
import io
import os

import torch

from tests.harness import run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --moe-router-score-function sigmoid "
        "--moe-router-topk-method noaux_tc --moe-router-bias-update-rate 0.01 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --mock-data --eval-iters 0 --log-interval 1 --lr 1e-3 --lr-decay-style constant "
        "--seed 3 --expert-model-parallel-size 2 --use-distributed-optimizer")


def _trainer(extra, fault=""):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    os.environ["MEGATRON_ASCEND_FAULT"] = fault
    try:
        return Trainer(parse(TINY.split() + extra.split(), "pretrain"), print_fn=lambda s: None)
    finally:
        os.environ.pop("MEGATRON_ASCEND_FAULT")


def _params(tr):
    return {n: p.detach().clone() for c in tr.model_chunks for n, p in c.module.named_parameters()}


def _body(root):
    from megatron_ascend.training.entry import cli
    out = {}
    # skip: NaN in layer 1's output on rank 1 at iteration 3
    tr = _trainer("--train-iters 4 --nan-policy skip --nan-trace-modules", "kind=nan,iter=3,layer=1,rank=1")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = tr.train()
    out["report"] = [l for l in buf.getvalue().splitlines() if l.startswith("WARNING: NaN")]
    ev = res.nan_events
    out["events"] = [(e.iteration, e.loss_ranks, e.grad_ranks, e.first_module, bool(e.grad_params)) for e in ev]
    out["losses"] = {i: res.losses[i]["lm loss"] for i in res.losses}
    out["skipped"] = tr.optimizer.num_skipped_steps
    tr.close()
    # the skipped update changed nothing: weights after iteration 3 (NaN) == a clean run of 2 iterations
    tr = _trainer("--train-iters 3 --nan-policy skip", "kind=nan,iter=3,layer=1,rank=1")
    tr.train()
    after_nan = _params(tr)
    tr.close()
    tr = _trainer("--train-iters 2")
    tr.train()
    clean2 = _params(tr)
    tr.close()
    out["skip_equal"] = sorted(after_nan) == sorted(clean2) and all(torch.equal(after_nan[k], clean2[k]) for k in clean2)
    # stop after 2 in a row: NaN at iterations 3 and 4 on rank 0 in layer 0; the last good state is iteration 2
    ck = f"{root}/ck"
    os.environ["MEGATRON_ASCEND_FAULT"] = "kind=nan,iter=3,layer=0,rank=0;kind=nan,iter=4,layer=0,rank=0"
    err, so = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
        out["stop_rc"] = cli(TINY.split() + f"--train-iters 6 --nan-max-consecutive 2 --save {ck}".split())
    os.environ.pop("MEGATRON_ASCEND_FAULT")
    out["stop_err"] = err.getvalue().strip()
    out["stop_reports"] = [l for l in so.getvalue().splitlines() if l.startswith("WARNING: NaN")]
    tr = _trainer(f"--train-iters 6 --load {ck}")
    out["stop_resume_iter"] = tr.iteration
    out["stop_equal"] = all(torch.equal(v, clean2[k]) for k, v in _params(tr).items())
    tr.close()
    # checks off: the NaN step is skipped without a report
    tr = _trainer("--train-iters 3 --no-check-for-nan-in-loss-and-grad", "kind=nan,iter=3,layer=1,rank=1")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = tr.train()
    out["off"] = (res.nan_events, "NaN/Inf" in buf.getvalue(), tr.optimizer.num_skipped_steps)
    tr.close()
    return out


def test_injected_nan_is_reported_and_handled_by_policy(tmp_path):
    res = run_distributed(2, _body, str(tmp_path), timeout=400)
    o = res[0]
    assert o["events"] == [(3, [1], [0, 1], {1: "model.layers.1"}, True)], o["events"]
    assert len(o["report"]) == 1, o["report"]
    line = o["report"][0]
    assert "NaN/Inf at iteration 3" in line and "non-finite loss on rank(s) 1" in line \
        and "first non-finite module output: rank 1 model.layers.1" in line and "policy skip" in line, line
    assert o["skipped"] == 1 and all(v == v for i, v in o["losses"].items() if i != 3) and o["losses"][3] != o["losses"][3]
    assert o["skip_equal"]
    assert o["stop_rc"] == 3, o
    assert o["stop_err"].count("\n") == 0 and "stopped after 2 NaN/Inf step(s) in a row" in o["stop_err"] \
        and "iteration 2" in o["stop_err"], o["stop_err"]
    assert [l.split(":")[1].strip() for l in o["stop_reports"]] == ["NaN/Inf at iteration 3", "NaN/Inf at iteration 4"]
    assert "rank 0" in o["stop_reports"][1] or "rank(s) 0" in o["stop_reports"][1]
    assert o["stop_resume_iter"] == 2 and o["stop_equal"]
    assert o["off"] == ([], False, 1)
    assert res[1]["report"] == [] and res[1]["stop_err"] == ""  # only rank 0 prints


def test_loss_spike_and_fp16_overflow_rules():
    from megatron_ascend.training.health import NanGuard
    lines = []
    g = NanGuard(spike_factor=3.0, spike_window=10, print_fn=lines.append)
    for i, v in enumerate([2.0, 2.1, 1.9, 2.0, 2.0, 2.05, 9.0, 2.0], start=1):
        assert g.after_step(i, {"lm loss": v}, 1.0) == "ok"
    assert [s["iteration"] for s in g.spikes] == [7] and "loss spike at iteration 7" in lines[0]
    fp16 = NanGuard(fp16=True, print_fn=lines.append)
    assert fp16.after_step(1, {"lm loss": 2.0}, float("inf")) == "ok"  # the loss scaler's overflow
    assert fp16.after_step(2, {"lm loss": float("nan")}, float("nan")) == "stop"
    bf = NanGuard(policy="stop", max_consecutive=2, print_fn=lines.append)
    assert [bf.after_step(i, {"lm loss": 1.0}, n) for i, n in enumerate([float("inf"), 1.0, float("nan"),
                                                                        float("nan")])] == ["skip", "ok", "skip", "stop"]
