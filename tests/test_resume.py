"""Exact resume: N steps straight vs N/2 steps, save, restart, N/2 more give bitwise identical losses and
parameters, at TP2 PP2 DP2 (8 gloo ranks) with the distributed optimizer, in fp32 and bf16; plus SIGTERM ->
checkpoint -> resume. The entry point runs in-process (training.entry.parse + Trainer) inside each worker."""
import os

import torch

from tests.harness import run_distributed

N = 4
PRECISIONS = tuple(os.environ.get("RESUME_PRECISIONS", "fp32,bf16").split(","))
TINY = ("--num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-router-bias-update-rate 0.01 "
        "--mtp-num-layers 1 --vocab-size 128 --make-vocab-size-divisible-by 1 --max-position-embeddings 64 "
        "--seq-length 16 --micro-batch-size 1 --global-batch-size 8 --lr 3e-3 --lr-warmup-iters 1 "
        "--eval-interval 2 --eval-iters 1 --log-interval 1 --mock-data --seed 7 "
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2 "
        "--use-distributed-optimizer")


def _args(extra):
    return TINY.split() + extra.split()


def _train(argv):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    tr = Trainer(parse(argv, "pretrain"), print_fn=lambda s: None)
    try:
        res = tr.train()
    finally:
        tr.close()
    params = {}
    for c in tr.model_chunks:
        for n, p in c.module.named_parameters():
            params[n] = p.detach().clone()
        for n, b in c.module.named_buffers():
            if "e_score_correction_bias" in n:
                params[n] = b.detach().clone()
    return res, params, tr


def _resume_body(root, precision):
    rank = torch.distributed.get_rank()
    out = {}
    for prec in precision:
        flag = " --bf16" if prec == "bf16" else ""
        full, p_full, _ = _train(_args(f"--train-iters {N}" + flag))
        d = os.path.join(root, prec)
        half, _, tr1 = _train(_args(f"--train-iters {N} --exit-interval {N // 2} --save {d}" + flag))
        rest, p_rest, tr2 = _train(_args(f"--train-iters {N} --load {d} --save {d}" + flag))
        same_loss = all(full.losses[i] == rest.losses[i] for i in range(N // 2 + 1, N + 1))
        same_first = all(full.losses[i] == half.losses[i] for i in range(1, N // 2 + 1))
        same_params = sorted(p_full) == sorted(p_rest) and all(torch.equal(p_full[k], p_rest[k]) for k in p_full)
        out[prec] = dict(same_loss=same_loss, same_first=same_first, same_params=same_params,
                         exit=half.exit_reason, start=sorted(rest.losses)[0], consumed=rest.consumed_samples,
                         full_losses=[full.losses[i]["lm loss"] for i in range(1, N + 1)],
                         rest_losses=[rest.losses[i]["lm loss"] for i in sorted(rest.losses)],
                         keys=sorted(full.losses[N]), val=full.validation, dtype=str(next(iter(p_full.values())).dtype),
                         saved=half.saved, n_params=len(p_full), rank=rank)
    return out


def test_resume_is_bitwise_exact_tp2_pp2_dp2_distopt(tmp_path):
    res = run_distributed(8, _resume_body, str(tmp_path), PRECISIONS, timeout=600)
    for r in res:
        for prec in PRECISIONS:
            o = r[prec]
            assert o["exit"] == f"exit-interval {N // 2}" and o["saved"] == [N // 2], o
            assert o["start"] == N // 2 + 1 and o["consumed"] == N * 8
            assert o["same_first"], (prec, r["rank"])
            assert o["same_loss"], (prec, r["rank"], o["full_losses"], o["rest_losses"])
            assert o["same_params"], (prec, r["rank"])
            assert o["val"] and all(set(v) >= {"lm loss"} for v in o["val"].values())
        assert all(r[p]["dtype"] == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[p] for p in PRECISIONS)
        # all ranks log the same reduced losses (broadcast from the last stage)
        assert r["fp32"]["full_losses"] == res[0]["fp32"]["full_losses"]
    # training moves the loss (a step that did nothing would also "resume exactly")
    fl = res[0]["fp32"]["full_losses"]
    assert fl[0] != fl[-1]
