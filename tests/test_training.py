"""The training entry point in-process on gloo ranks: TensorBoard scalars under Megatron's names (read back with
tensorboard's event reader), the log line, evaluation, SIGTERM -> checkpoint -> exit, --exit-duration-in-mins,
and one-line configuration errors with exit code 2."""
import math
import os
import signal

import pytest
import torch

from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_close, assert_rel

TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-aux-loss-coeff 1e-3 "
        "--mtp-num-layers 1 --vocab-size 128 --make-vocab-size-divisible-by 1 --max-position-embeddings 64 "
        "--seq-length 16 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --eval-iters 1 --mock-data "
        "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 2 "
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --use-distributed-optimizer")


def _trainer(extra, lines=None):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    return Trainer(parse(TINY.split() + extra.split(), "pretrain"),
                   print_fn=(lines.append if lines is not None else (lambda s: None)))


def _body(root):
    rank = torch.distributed.get_rank()
    out = {}
    # 1) a short run with TensorBoard, eval every 2, log every 2
    lines = []
    tr = _trainer(f"--train-iters 4 --eval-interval 2 --log-interval 2 --tensorboard-dir {root}/tb", lines)
    res = tr.train()
    tr.close()
    out["lines"] = lines if tr.is_logging_rank else []
    out["losses"] = res.losses
    out["validation"] = res.validation
    # 2) SIGTERM during iteration 2 on rank 0 only: every rank saves at the end of that iteration and exits
    tr = _trainer(f"--train-iters 50 --eval-interval 100 --log-interval 100 --save {root}/ck")
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == 3 and rank == 0:  # 2 micro-batches per rank per iteration: the first of iteration 2
            os.kill(os.getpid(), signal.SIGTERM)

    if rank == 0:
        tr.model_chunks[0].module.register_forward_pre_hook(hook)
    res = tr.train()
    tr.close()
    out["sigterm"] = (res.exit_reason, res.iteration, res.saved)
    # 3) resume from that checkpoint with an exit after 1e-6 minutes: one more iteration, then save and exit
    tr = _trainer(f"--train-iters 50 --eval-interval 100 --log-interval 100 --load {root}/ck --save {root}/ck "
                  f"--exit-duration-in-mins 1e-6")
    res = tr.train()
    tr.close()
    out["duration"] = (res.exit_reason, sorted(res.losses), res.saved, res.consumed_samples)
    return out


def _scalars(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_entry_point_tensorboard_eval_sigterm_exit(tmp_path):
    res = run_distributed(4, _body, str(tmp_path), timeout=400)
    ev = _scalars(str(tmp_path / "tb"))
    names = ["lm loss", "learning-rate", "grad-norm", "iteration-time", "throughput", "mem-allocated-bytes",
             "load_balancing_loss", "mtp_1 loss", "lm loss validation", "lm loss validation ppl", "tokens-per-sec",
             "moe/tokens_per_expert_imbalance_layer_1", "moe/tokens_per_expert_imbalance_layer_2"]
    for n in names:
        assert n in ev, (n, sorted(ev))
        assert f"{n} vs samples" in ev, n
    assert [s for s, _ in ev["lm loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in ev["lm loss vs samples"]] == [4, 8, 12, 16]
    assert [s for s, _ in ev["lm loss validation"]] == [2, 4]
    assert [s for s, _ in ev["iteration-time"]] == [2, 4]
    # the scalars are the reduced losses every rank computed
    for it in (1, 2, 3, 4):
        for r in res:
            assert r["losses"][it] == res[0]["losses"][it]
        for k in ("lm loss", "mtp_1 loss"):  # TensorBoard stores fp32: one rounding
            assert_close(ev[k][it - 1][1], res[0]["losses"][it][k], f"TensorBoard {k} {it}", dtype=torch.float32,
                         terms=1)
        assert res[0]["losses"][it]["load_balancing_loss"] > 0
    v = ev["lm loss validation"][-1][1]
    # exp of the fp32-stored loss (~5) and one more fp32 rounding: a few eps relative
    assert_close(ev["lm loss validation ppl"][-1][1], math.exp(v), "TensorBoard ppl", dtype=torch.float32, terms=1)
    assert all(val >= 1.0 for _, val in ev["moe/tokens_per_expert_imbalance_layer_1"])
    lines = [l for r in res for l in r["lines"]]
    assert len([l for l in lines if l.startswith(" iteration")]) == 2
    first = next(l for l in lines if l.startswith(" iteration"))
    for field in ("consumed samples:            8", "elapsed time per iteration (ms):", "learning rate:",
                  "global batch size:     4", "lm loss:", "mtp_1 loss:", "load_balancing_loss:", "grad norm:",
                  "number of skipped iterations:   0", "number of nan iterations:   0", "tokens/s:",
                  "throughput per device (TFLOP/s/device):", "MFU:", "mem allocated (GiB):"):
        assert field in first, (field, first)
    assert any("validation loss at iteration 4" in l for l in lines)
    for r in res:
        assert r["sigterm"] == ("SIGTERM", 2, [2]), r["sigterm"]
        reason, iters, saved, consumed = r["duration"]
        assert reason.startswith("exit-duration-in-mins") and iters == [3] and saved == [3] and consumed == 12
    assert os.path.isdir(tmp_path / "ck")


def test_config_error_is_one_line_exit_2(capsys):
    from megatron_ascend import posttrain, pretrain
    assert pretrain.main(TINY.split() + ["--train-iters", "2", "--tensor-model-parallel-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: world size 1 is not a multiple")
    assert pretrain.main(["--mock-data"]) == 2
    assert "--train-iters" in capsys.readouterr().err
    assert posttrain.main(["--stage", "dpo", "--train-iters", "1", "--mock-data"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_show_layout_and_help(capsys, monkeypatch):
    from megatron_ascend import pretrain
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert pretrain.main(TINY.split() + ["--tensor-model-parallel-size", "2", "--show-layout"]) == 0
    out = capsys.readouterr().out
    assert "world 8: tp 2 cp 1 pp 2 dp 2" in out and "pp stage 1: ranks 4,5,6,7" in out
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0
    assert "--tensor-model-parallel-size" in capsys.readouterr().out


PARITY = ("--num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
          "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
          "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
          "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-aux-loss-coeff 1e-2 "
          "--moe-router-bias-update-rate 1e-2 --mtp-num-layers 1 --vocab-size 128 --make-vocab-size-divisible-by 1 "
          "--max-position-embeddings 64 --seq-length 16 --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 "
          "--train-iters 3 --eval-interval 3 --eval-iters 1 --log-interval 1 --mock-data --seed 3")


def _parity_body(extra):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    tr = Trainer(parse(PARITY.split() + extra.split(), "pretrain"), print_fn=lambda s: None)
    res = tr.train()
    tr.close()
    return res.losses, res.grad_norms, res.validation


def test_trainer_losses_equal_single_process_at_tp2_pp2_ep2_dp2():
    """The whole loop (schedule, loss normalisation, DDP, distributed optimizer, clipping, bias update, MTP,
    balance loss, evaluation) at TP2 PP2 EP2 DP2 gives the single-process losses and grad norms (fp32)."""
    (ref_l, ref_g, ref_v), = run_distributed(1, _parity_body, "", timeout=200)
    par = run_distributed(8, _parity_body, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                                           "--expert-model-parallel-size 2 --use-distributed-optimizer",
                          timeout=300)
    for losses, gnorms, val in par:  # whole-model figures (tests/tolerance.py MODEL_REL), every iteration
        for it in (1, 2, 3):
            for k in ("lm loss", "mtp_1 loss", "load_balancing_loss"):
                assert_rel(losses[it][k], ref_l[it][k], MODEL_REL, f"iteration {it} {k}")
            assert_rel(gnorms[it], ref_g[it], MODEL_REL, f"iteration {it} grad norm")
        assert_rel(val[3]["lm loss"], ref_v[3]["lm loss"], MODEL_REL, "validation loss after 3 iterations")
    assert ref_l[1]["lm loss"] != ref_l[3]["lm loss"]
