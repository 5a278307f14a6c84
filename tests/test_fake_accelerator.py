"""The fake accelerator (platform/fake.py): collectives that refuse host tensors (and, under HCCL rules, float64 /
bool reductions) as NCCL / HCCL do, so the class "host tensor handed to a collective" is caught on CPU.

* the checker itself on a 2-rank world: what it refuses and what it lets through, with the messages;
* a whole training run through the trainer under the HCCL rules (4 ranks, two layouts): evaluation, logging
  with TensorBoard, checkpoint save, SIGTERM on one rank -> every rank saves and exits, then a resume at another
  layout (TP2 + sequence parallel, bf16, the all-gather dispatcher) with --exit-duration-in-mins. Before this
  issue's fixes the first run died at the end of iteration 1 (signals.py all-reduced a host tensor; token
  counts, logged losses and MoE statistics were float64 reductions HCCL refuses).
"""
import os
import signal

import pytest
import torch

from tests.harness import run_distributed


def _checker_body():
    import torch.distributed as dist
    from megatron_ascend import platform
    from megatron_ascend.platform.fake import (DeviceMismatch, HostTensorInCollective, UnsupportedCollectiveDtype,
                                               fake_accelerator, is_host)
    from megatron_ascend.training.signals import ExitSignalHandler
    rank = dist.get_rank()
    out = {}
    with fake_accelerator("hccl") as acc:
        dev = platform.get_platform().device()
        out["device"] = str(dev)
        host = torch.tensor([1.0])
        on_dev = torch.tensor([1.0], device=dev)
        moved = host.to(dev)
        out["tags"] = (is_host(host), is_host(on_dev), is_host(moved), is_host(on_dev + 1), is_host(host * 2),
                       is_host(moved.cpu()), is_host(host), str(on_dev.device), str(host.device),
                       is_host(torch.zeros(2, device=on_dev.device)), is_host(on_dev.new_zeros(3)))
        with pytest.raises(HostTensorInCollective, match="No backend type associated with device type cpu"):
            dist.all_reduce(host)
        dist.all_reduce(on_dev)
        out["sum"] = on_dev.item()
        with pytest.raises(UnsupportedCollectiveDtype, match="float64"):
            dist.all_reduce(torch.zeros(1, dtype=torch.float64, device=dev))
        with pytest.raises(UnsupportedCollectiveDtype, match="bool"):
            dist.all_reduce(torch.zeros(1, dtype=torch.bool, device=dev), op=dist.ReduceOp.MAX)
        dist.broadcast(torch.zeros(1, dtype=torch.float64, device=dev), src=0)  # not a reduction: HCCL sends it
        with pytest.raises(HostTensorInCollective):
            dist.all_gather([torch.zeros(1, device=dev) for _ in range(2)], host)
        with pytest.raises(DeviceMismatch):
            torch.cat([on_dev, host])
        gloo = dist.new_group([0, 1], backend="gloo")  # an explicit host group (the async checkpoint writer's)
        dist.all_reduce(host, group=gloo)
        out["gloo"] = host.item()
        h = ExitSignalHandler()
        if rank == 1:
            h.trigger()
        out["signal"] = h.received()
        out["calls"] = dict(acc.calls)
    out["restored"] = platform.get_platform().kind
    dist.all_reduce(torch.tensor([1.0]))  # outside the block gloo takes host tensors again
    with fake_accelerator("nccl"):
        dist.all_reduce(torch.zeros(1, dtype=torch.float64, device=platform.get_platform().device()))
    return out


def test_checker_refuses_what_hccl_refuses():
    res = run_distributed(2, _checker_body, timeout=120)
    for rank, r in enumerate(res):
        assert r["device"] == f"cpu:{rank}"
        assert r["tags"] == (True, False, False, False, True, True, True, f"cpu:{rank}", "cpu", False, False)
        assert r["sum"] == 2.0 and r["gloo"] == 2.0
        assert r["signal"] is True  # rank 1's SIGTERM reaches both ranks through a device tensor
        assert r["calls"]["all_reduce"] >= 5 and r["restored"] == "cpu"


TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-aux-loss-coeff 1e-3 "
        "--mtp-num-layers 1 --vocab-size 128 --make-vocab-size-divisible-by 1 --max-position-embeddings 64 "
        "--seq-length 16 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --eval-iters 1 --mock-data "
        "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 2 --pipeline-model-parallel-size 2")
LAYOUT_A = "--expert-model-parallel-size 2 --use-distributed-optimizer --overlap-grad-reduce"
LAYOUT_B = ("--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
            "--expert-tensor-parallel-size 1 --moe-token-dispatcher-type allgather --bf16")


def _trainer(extra, lines):
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    return Trainer(parse(TINY.split() + extra.split(), "pretrain"), print_fn=lines.append)


def _training_body(root):
    import torch.distributed as dist
    from megatron_ascend.platform.fake import fake_accelerator
    rank = dist.get_rank()
    out = {}
    with fake_accelerator("hccl") as acc:
        lines = []
        tr = _trainer(f"{LAYOUT_A} --train-iters 50 --eval-interval 2 --log-interval 1 --save {root}/ck "
                      f"--save-interval 2 --tensorboard-dir {root}/tb", lines)
        calls = {"n": 0}

        def hook(module, args):  # SIGTERM on rank 0 only, during iteration 3 (2 micro-batches per iteration and
            calls["n"] += 1      # 2 for the evaluation after iteration 2)
            if calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGTERM)

        if rank == 0:
            tr.model_chunks[0].module.register_forward_pre_hook(hook)
        res = tr.train()
        tr.close()
        out["a"] = (res.exit_reason, res.iteration, res.saved, sorted(res.validation), res.losses)
        out["a_lines"] = lines if tr.is_logging_rank else []
        lines = []
        tr = _trainer(f"{LAYOUT_B} --train-iters 50 --eval-interval 1 --log-interval 1 --load {root}/ck "
                      f"--save {root}/ck --exit-duration-in-mins 1e-6", lines)
        res = tr.train()
        tr.close()
        out["b"] = (res.exit_reason, res.iteration, res.saved, sorted(res.validation), res.losses)
        out["calls"] = dict(acc.calls)
    return out


def test_training_run_under_fake_hccl(tmp_path):
    res = run_distributed(4, _training_body, str(tmp_path), timeout=400)
    for r in res:
        reason, it, saved, val, losses = r["a"]
        assert (reason, it, saved, val) == ("SIGTERM", 3, [2, 3], [2]), r["a"][:4]
        assert all(torch.isfinite(torch.tensor(v["lm loss"])) for v in losses.values())
        reason, it, saved, val, losses = r["b"]
        assert reason.startswith("exit-duration-in-mins") and (it, saved, val) == (4, [4], [4]), r["b"][:4]
        assert sorted(losses) == [4] and losses[4] == res[0]["b"][4][4]
        # the run really went through the checked collectives: grads, p2p, MoE all-to-all / all-gather, TP + SP
        calls = r["calls"]
        assert calls["all_reduce"] > 10 and calls["batch_isend_irecv"] > 0
        assert calls.get("reduce_scatter_single", 0) > 0 and calls.get("all_gather_single", 0) > 0
    assert res[3]["calls"]["all_to_all_single"] > 0  # an expert rank of the last stage
    lines = [l for r in res for l in r["a_lines"]]
    assert sum(l.startswith(" iteration") for l in lines) == 3
    assert any("validation loss at iteration 2" in l for l in lines)
    assert os.path.isdir(tmp_path / "tb") and os.path.isdir(tmp_path / "ck" / "iter_0000004")
