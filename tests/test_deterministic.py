"""--deterministic (platform.RuntimeOptions, applied by platform/device.py, npu.py, cuda.py): on CPU two runs of
the trainer (2 gloo ranks, EP2, distributed optimizer, MTP) end with bitwise equal parameters and losses, with
torch's deterministic algorithms on (no op of the model raises for lacking a deterministic kernel); the NPU and
CUDA environments carry every variable determinism needs there (a user value that disagrees is replaced, with
a start-up note naming it)."""
import torch

from tests.harness import run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --moe-router-score-function sigmoid "
        "--moe-router-topk-method noaux_tc --moe-router-bias-update-rate 0.01 --mtp-num-layers 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --mock-data --eval-iters 0 --log-interval 1 --lr 1e-3 --seed 5 --train-iters 3 "
        "--expert-model-parallel-size 2 --use-distributed-optimizer --deterministic")


def _body():
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    runs = []
    for _ in range(2):
        tr = Trainer(parse(TINY.split(), "pretrain"), print_fn=lambda s: None)
        res = tr.train()
        runs.append(({i: res.losses[i]["lm loss"] for i in res.losses},
                     {n: p.detach().clone() for c in tr.model_chunks for n, p in c.module.named_parameters()}))
        tr.close()
    (l1, p1), (l2, p2) = runs
    return {"det": torch.are_deterministic_algorithms_enabled(), "losses": l1 == l2,
            "params": sorted(p1) == sorted(p2) and all(torch.equal(p1[k], p2[k]) for k in p1),
            "moved": any(not torch.equal(v, 0 * v) for v in p1.values())}


def test_two_deterministic_cpu_runs_are_bitwise_equal():
    for r in run_distributed(2, _body, timeout=300):
        assert r == {"det": True, "losses": True, "params": True, "moved": True}, r


def test_platform_environments():
    from megatron_ascend.platform import cuda, npu
    from megatron_ascend.platform.runtime import RuntimeOptions
    det = RuntimeOptions(deterministic=True)
    env, _ = npu.environment(det, {})
    assert env["HCCL_DETERMINISTIC"] == "true" and env["LCCL_DETERMINISTIC"] == "1" and env["CLOSE_MATMUL_K_SHIFT"] == "1"
    env, notes = cuda.environment(det, {"NCCL_ALGO": "Tree"})
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and env["NCCL_ALGO"] == "Ring"
    assert env["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] == "0"
    assert any("NCCL_ALGO=Ring" in n and "replaces the environment's Tree" in n for n in notes), notes
    assert "NCCL_ALGO" not in cuda.environment(RuntimeOptions(), {})[0]  # only with --deterministic
