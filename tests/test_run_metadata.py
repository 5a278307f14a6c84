"""Run metadata (monitoring/run_metadata.py) and --exit-at-loss, through the trainer's entry point on 2 gloo ranks
(PP2, so the writing rank is not rank 0): every field is there and says what ran, the data checksum is the files'
SHA-256, rank_stats.jsonl covers every iteration from every rank, recording does not change a single loss, and
--exit-at-loss stops every rank at the same iteration."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_ascend.config import ConfigError
from tests.harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench", "reference"))

TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-aux-loss-coeff 1e-3 "
        "--mtp-num-layers 1 --vocab-size 64 --make-vocab-size-divisible-by 1 --max-position-embeddings 64 "
        "--seq-length 16 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --eval-iters 1 --eval-interval 100 "
        "--split 90,10,0 --seed 5")
PP2 = " --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 2"


def _run(extra):
    from megatron_ascend.training.entry import run
    return run((TINY + PP2).split() + extra.split(), "pretrain", print_fn=lambda s: None)


def _body(root, data):
    out = {}
    res = _run(f"--data-path {data} --train-iters 7 --log-interval 3 --tensorboard-dir {root}/tb")
    out["with"] = res.losses
    from megatron_ascend.platform import kernels
    out["kernels"] = kernels.table()  # what the trainer's process resolved (the test's process binds nothing)
    res = _run(f"--data-path {data} --train-iters 7 --log-interval 3")  # no output dir: nothing recorded
    out["without"] = res.losses
    res = _run(f"--data-path {data} --train-iters 20 --log-interval 5 --exit-at-loss 100 --exit-at-loss-window 3 "
               f"--save {root}/ck --tensorboard-dir {root}/tb_exit")
    out["exit"] = (res.exit_reason, res.iteration, res.saved)
    return out


@pytest.fixture(scope="module")
def metadata_run(tmp_path_factory):
    import make_data
    root = tmp_path_factory.mktemp("meta")
    make_data.build_pretrain(str(root / "data" / "syn"), seed=2, num_docs=120, vocab_size=64, min_len=20,
                             max_len=60)
    env = {"MEGATRON_ASCEND_RECIPE": json.dumps({"name": "unit", "version": 3, "target_loss": 4.0}),
           "MEGATRON_ASCEND_CACHE": str(root / "cache")}
    res = run_distributed(2, _body, str(root), str(root / "data" / "syn_text_document"), timeout=300, env=env)
    return root, res


def test_metadata_fields(metadata_run):
    root, res = metadata_run
    meta = json.load(open(root / "tb" / "run_metadata.json"))
    assert meta["schema"] == "megatron_ascend.run_metadata/1" and meta["stage"] == "pretrain"
    assert meta["seed"] == 5 and meta["precision"] == "fp32"
    assert meta["recipe"] == {"name": "unit", "version": 3, "target_loss": 4.0}
    hw = meta["hardware"]
    assert hw["platform"] == "cpu" and hw["device_count"] == 2 and hw["nodes"] == 1 and hw["device_memory_bytes"] > 0
    assert hw["interconnect"]["backend"] == "gloo"
    sw = meta["software"]
    assert sw["torch"] == torch.__version__ and sw["python"] == sys.version.split()[0]
    lib = meta["library"]
    assert lib["version"] == "0.1.0"
    if shutil.which("git"):
        head = subprocess.run(["git", "-C", os.path.join(REPO, "megatron_ascend"), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
        if head.returncode == 0:
            assert lib["git_commit"] == head.stdout.strip()
    lay = meta["layout"]
    assert (lay["world_size"], lay["tp"], lay["pp"], lay["dp"], lay["num_microbatches"]) == (2, 1, 2, 1, 4)
    cfg = meta["config"]
    assert cfg["model"]["num_hidden_layers"] == 3 and cfg["training"]["train_iters"] == 7
    assert cfg["args"]["exit_at_loss"] is None and cfg["args"]["global_batch_size"] == 4
    assert {k: v["status"] for k, v in meta["kernels"].items()} == res[0]["kernels"] == res[1]["kernels"]
    assert meta["kernels"]["rms_norm"]["impl"].startswith("megatron_ascend.platform.kernels.")
    # data: each file's SHA-256, and the checksum over (name, hash) pairs; the generator's stamp rides along
    data = meta["data"]
    hashes = {}
    for ext in (".bin", ".idx"):
        path = str(root / "data" / f"syn_text_document{ext}")
        hashes[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert data["files"][path]["sha256"] == hashes[path]
        assert data["files"][path]["bytes"] == os.path.getsize(path)
    lines = sorted(f"{os.path.basename(p)} {h}" for p, h in hashes.items())
    assert data["checksum"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert list(data["generator"].values())[0]["generator"] == "ma-synth"
    tp = meta["throughput"]
    assert tp["tokens_per_step"] == 4 * 16 and tp["flops_per_token"] > 0 and tp["peak_tflops_per_device"] > 0
    assert tp["peak_source"] == "measured matmul ceiling (CPU)"


def test_rank_stats_and_numerics_unchanged(metadata_run):
    root, res = metadata_run
    lines = [json.loads(x) for x in open(root / "tb" / "rank_stats.jsonl")]
    assert [ln["iterations"] for ln in lines] == [[1, 2, 3], [4, 5, 6], [7]]
    for ln in lines:
        n = len(ln["iterations"])
        assert len(ln["step_seconds_max"]) == len(ln["step_seconds_min"]) == n
        assert all(a >= b > 0 for a, b in zip(ln["step_seconds_max"], ln["step_seconds_min"]))
        for key in ("rank_step_seconds_mean", "rank_mem_max_allocated_bytes", "rank_probe_tflops"):
            assert len(ln[key]) == 2 and all(v > 0 for v in ln[key]), key
    # only the writing rank (the last) wrote; recording changes no loss on any rank
    for r in res:
        assert r["with"] == r["without"]
        assert sorted(r["with"]) == list(range(1, 8))


def test_exit_at_loss(metadata_run):
    root, res = metadata_run
    for r in res:
        reason, it, saved = r["exit"]
        assert it == 3 and saved == [3] and reason.startswith("exit-at-loss 100")
    assert res[0]["exit"] == res[1]["exit"]
    assert open(root / "ck" / "latest_checkpointed_iteration.txt").read().strip() == "3"
    from megatron_ascend.training.loss_target import LossTarget
    t = LossTarget(2.0, 3)  # one process: the decision is local
    for loss, reached in ((1.0, False), (float("nan"), False), (1.5, False), (3.0, True), (5.0, False)):
        t.update(loss)  # windows: [1] [1] [1, 1.5] [1, 1.5, 3] (mean 1.83) [1.5, 3, 5] (mean 3.17)
        assert t.reached(torch.device("cpu")) is reached, loss
    assert not LossTarget(None).reached(torch.device("cpu"))
    with pytest.raises(ConfigError, match="exit-at-loss-window 0"):
        LossTarget(3.0, 0)
    with pytest.raises(ConfigError, match="not a finite number"):
        LossTarget(float("nan"))


def test_checksum_cache_and_background_hash(tmp_path, monkeypatch):
    from megatron_ascend.monitoring import checksum, run_metadata
    monkeypatch.setenv("MEGATRON_ASCEND_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "d.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = checksum.stream_sha256
    monkeypatch.setattr(checksum, "stream_sha256", lambda p: calls.append(p) or real(p))
    h = checksum.file_sha256(str(f))
    assert h == hashlib.sha256(b"x" * 1000).hexdigest() and len(calls) == 1
    assert checksum.file_sha256(str(f)) == h and len(calls) == 1  # cached by size + mtime
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(1, 1))
    assert checksum.file_sha256(str(f)) == hashlib.sha256(b"y" * 1000).hexdigest() and len(calls) == 2
    # above the synchronous limit the hash runs in a thread and rewrites the file when done
    (tmp_path / "p_text_document.idx").write_bytes(b"i" * 10)
    (tmp_path / "p_text_document.bin").write_bytes(b"b" * 10)
    monkeypatch.setenv(run_metadata.HASH_SYNC_ENV, "0")
    from megatron_ascend.arguments import build_configs, parse_args
    args = parse_args(TINY.split() + ["--data-path", str(tmp_path / "p_text_document"), "--train-iters", "1",
                                      "--tensorboard-dir", str(tmp_path / "tb")])
    model, par, opt, train, data = build_configs(args, 1)
    rec = run_metadata.RunRecorder.start(
        out_dir=str(tmp_path / "tb"), rank=0, world=1, writer_rank=0, interval=5, device=torch.device("cpu"),
        args=args, stage="pretrain", model=model, parallel=par, optimizer=opt, training=train, data=data, vp=1,
        num_microbatches=4, global_batch_size=4, flops_per_token=1.0, peak_tflops=None, peak_source="none")
    rec.wait(60)
    meta = json.load(open(tmp_path / "tb" / "run_metadata.json"))
    assert meta["data"]["files"][str(tmp_path / "p_text_document.bin")]["sha256"] == \
        hashlib.sha256(b"b" * 10).hexdigest()
    assert len(meta["data"]["checksum"]) == 64
    # a second start keeps the first file
    rec2 = run_metadata.RunRecorder.start(
        out_dir=str(tmp_path / "tb"), rank=0, world=1, writer_rank=0, interval=5, device=torch.device("cpu"),
        args=args, stage="pretrain", model=model, parallel=par, optimizer=opt, training=train, data=data, vp=1,
        num_microbatches=4, global_batch_size=4, flops_per_token=1.0, peak_tflops=None, peak_source="none")
    rec2.wait(60)
    assert (tmp_path / "tb" / "run_metadata.prev-1.json").exists()


def test_kernel_reader_is_tolerant(monkeypatch):
    from megatron_ascend.monitoring import run_metadata
    from megatron_ascend.platform import kernels
    monkeypatch.setattr(kernels, "table", lambda: {"rms_norm": {"status": "fused", "impl": "torch_npu.npu_rms_norm",
                                                                "source": "torch_npu"}, "swiglu": "reference"})
    t = run_metadata.kernel_table()
    assert t["rms_norm"]["impl"] == "torch_npu.npu_rms_norm" and t["rms_norm"]["source"] == "torch_npu"
    assert t["swiglu"]["status"] == "reference"

    def boom():
        raise RuntimeError("table broke")
    monkeypatch.setattr(kernels, "table", boom)
    t = run_metadata.kernel_table()
    assert "table broke" in t["_error"]["status"] and "impl" in t["rms_norm"]
