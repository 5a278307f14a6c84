"""The bad-input catalogue: every case exits non-zero with ONE line (``error: ...``, the first line of stderr)
naming the value and the fix, before any work that it would spoil, and leaves no partial output.

How each group runs (cheap: nothing here spawns a process per case):

* ``flag``: ``python -m megatron_ascend.pretrain`` (training.entry.cli) in the pytest process; these are
  refused before any process group exists (platform.init_distributed is replaced by a tripwire that fails the
  case if it is reached). WORLD_SIZE sets the world the flags are checked for. Nothing is created.
* ``run``: the same entry point on one gloo rank (one harness world runs the whole group): data files and
  checkpoints, which are read after the process group exists. The data directory and the checkpoint
  directory must hold the same files afterwards (no index cache, no save directory).
* ``tool``: tools/preprocess_data.py, tools/convert_ckpt.py, tools/reshard.py, tools/plan.py in-process.

A case is (id, group, arguments / setup, words the line must contain). The catalogue (the ids below) is
listed with the words each line must contain in docs/USER_GUIDE.md section 9 ("Bad inputs").
"""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from tests.harness import run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 1 --eval-iters 0 --log-interval 1 --train-iters 2")

# ------------------------------------------------------------------------------------------------ flags
# (id, world size, extra flags (replacing --mock-data unless data flags are given), words in the error line)
FLAG_CASES = [
    ("tp-not-dividing-world", 2, "--tensor-model-parallel-size 3", ["world size 2", "multiple"]),
    ("ep-not-dividing-experts", 3, "--expert-model-parallel-size 3", ["expert-model-parallel-size 3", "num-experts 4"]),
    ("pp-zero", 1, "--pipeline-model-parallel-size 0", ["pipeline-model-parallel-size", "0", ">= 1"]),
    ("etp-not-dividing-expert-width", 3, "--expert-tensor-parallel-size 3", ["moe-ffn-hidden-size 16",
                                                                           "expert-tensor-parallel-size 3"]),
    ("layers-not-splitting-over-pp", 2, "--pipeline-model-parallel-size 2 --num-layers 3", ["num-layers 3"]),
    ("heads-not-dividing-tp", 8, "--tensor-model-parallel-size 8", ["num-attention-heads 4", "8"]),
    ("topk-above-experts", 1, "--moe-router-topk 5", ["5", "4"]),
    ("num-layers-zero", 1, "--num-layers 0", ["--num-layers", "is 0"]),
    ("vocab-zero", 1, "--vocab-size 0", ["--vocab-size", "is 0"]),
    ("seq-above-positions", 1, "--seq-length 128", ["seq-length 128", "max-position-embeddings 64"]),
    ("groups-not-dividing-experts", 1, "--moe-router-num-groups 3 --moe-router-group-topk 1", ["3", "4"]),
    ("gbs-not-divisible", 2, "--global-batch-size 3", ["global-batch-size 3", "multiple of 2"]),
    ("micro-batch-zero", 1, "--micro-batch-size 0", ["--micro-batch-size 0"]),
    ("global-batch-zero", 1, "--global-batch-size 0", ["--global-batch-size 0"]),
    ("train-iters-zero", 1, "--train-iters 0", ["--train-iters"]),
    ("log-interval-zero", 1, "--log-interval 0", ["--log-interval 0", ">= 1"]),
    ("clip-grad-negative", 1, "--clip-grad -1", ["--clip-grad -1", ">= 0"]),
    ("weight-decay-negative", 1, "--weight-decay -1", ["--weight-decay -1", ">= 0"]),
    ("num-workers-negative", 1, "--num-workers -1", ["--num-workers -1", ">= 0"]),
    ("save-interval-zero", 1, "--save-interval 0", ["--save-interval 0", ">= 1"]),
    ("eval-interval-zero", 1, "--eval-interval 0 --eval-iters 1", ["--eval-interval 0", ">= 1"]),
    ("warmup-beyond-decay", 1, "--lr-warmup-iters 5", ["--lr-warmup-iters 5"]),
    ("mock-data-and-data-path", 1, "--mock-data --data-path {data}/corpus", ["--mock-data", "--data-path"]),
    ("bf16-and-fp16", 1, "--bf16 --fp16", ["--bf16", "--fp16"]),
    ("scheduler-override-and-use-checkpoint", 1,
     "--override-opt_param-scheduler --use-checkpoint-opt_param-scheduler", ["pick one"]),
    ("nan-max-consecutive-zero", 1, "--nan-max-consecutive 0", ["--nan-max-consecutive 0"]),
    ("split-all-zero", 1, "--split 0,0,0", ["--split"]),
    ("data-path-missing", 1, "--data-path {data}/nope", ["{data}/nope", ".bin"]),
    ("data-path-odd-blend", 1, "--data-path 0.5 {data}/corpus 0.5", ["weight-prefix pairs"]),
    ("no-data-at-all", 1, "--no-mock", ["--data-path", "--mock-data"]),
    ("tokenizer-unknown", 1, "--tokenizer-type FooTokenizer --tokenizer-model {data}/sp.model", ["FooTokenizer"]),
    ("tokenizer-model-missing", 1, "--tokenizer-type SentencePieceTokenizer --tokenizer-model {data}/none.model",
     ["{data}/none.model"]),
    ("tokenizer-model-not-given", 1, "--tokenizer-type SentencePieceTokenizer", ["--tokenizer-model"]),
    ("save-unwritable", 1, "--save /proc/ma_bad_save", ["--save '/proc/ma_bad_save'", "not writable"]),
    ("tensorboard-under-a-file", 1, "--tensorboard-dir {data}/corpus.bin/tb", ["--tensorboard-dir", "is a file"]),
    ("load-missing", 1, "--load {data}/no_such_ckpt", ["--load", "does not exist"]),
    ("load-hf-directory", 1, "--load {data}/hf", ["HuggingFace model directory", "convert_ckpt.py --direction hf2ma"]),
    ("load-is-a-file", 1, "--load {data}/corpus.bin", ["--load", "is a file"]),
]


def _argv(extra, data):
    extra = extra.format(data=data)
    base = TINY.split()
    if "--data-path" in extra or "--no-mock" in extra:
        return base + extra.replace("--no-mock", "").split()
    return base + ["--mock-data"] + extra.split()


def _one_line(err: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert sum(ln.startswith("error:") for ln in lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny indexed corpus (ids < 100), a SentencePiece model and a fake HF directory."""
    from tests.test_data_common import build_indexed, stdlib_texts
    from megatron_ascend.data import tokenizer_training as tt
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    build_indexed(d / "corpus", [rng.integers(0, 100, size=40) for _ in range(30)])
    build_indexed(d / "big_ids", [rng.integers(0, 1000, size=40) for _ in range(30)])
    build_indexed(d / "empty", [])
    lines = [ln for t in stdlib_texts(8) for ln in t.split("\n") if ln.strip()]
    src = tt.train_sentencepiece(lines, str(d / "sp_train" / "tok"), vocab_size=600)
    shutil.copy(src, d / "sp.model")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")
    (d / "hf" / "model.safetensors").write_bytes(b"")
    return str(d)


def _listing(root):
    """Files under ``root``, without dataset index caches (``cache/``: complete, reusable scan results)."""
    return sorted(os.path.relpath(os.path.join(p, f), root) for p, _, fs in os.walk(root) for f in fs
                  if "cache" not in os.path.relpath(p, root).split(os.sep))


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(case, data_dir, monkeypatch):
    from megatron_ascend import platform
    from megatron_ascend.training.entry import cli
    cid, world, extra, words = case

    def tripwire(*a, **k):
        raise AssertionError(f"{cid}: the flags passed validation and the run reached init_distributed")
    monkeypatch.setattr(platform, "init_distributed", tripwire)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    before = _listing(data_dir)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli(_argv(extra, data_dir))
    line = _one_line(err.getvalue())
    assert rc == 2, (cid, rc, line)
    for w in words:
        assert w.format(data=data_dir) in line, (cid, line)
    assert _listing(data_dir) == before, cid
    assert not os.path.exists("/proc/ma_bad_save")


def test_bad_flag_prints_nothing_on_other_ranks(data_dir, monkeypatch):
    """Under torchrun every rank meets the same flag error; only rank 0 prints it."""
    from megatron_ascend.training.entry import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(_argv("--log-interval 0", data_dir)) == 2
    assert err.getvalue() == ""


# ------------------------------------------------------------------------------------------------ runs (1 rank)
def _damage_data(d):
    """Copies of the corpus with a truncated .idx / .bin."""
    for kind in ("trunc_idx", "trunc_bin"):
        for ext in (".bin", ".idx"):
            shutil.copy(os.path.join(d, "corpus" + ext), os.path.join(d, kind + ext))
    for kind, ext in (("trunc_idx", ".idx"), ("trunc_bin", ".bin")):
        p = os.path.join(d, kind + ext)
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)


RUN_CASES = [
    # (id, extra flags, words); {data} / {ck} are filled in
    ("idx-truncated", "--data-path {data}/trunc_idx", ["{data}/trunc_idx.idx"]),
    ("bin-truncated", "--data-path {data}/trunc_bin", ["{data}/trunc_bin.bin"]),
    ("ids-outside-vocab", "--data-path {data}/big_ids", ["{data}/big_ids", "vocab"]),
    ("wrong-tokenizer", "--data-path {data}/big_ids --tokenizer-type SentencePieceTokenizer "
                        "--tokenizer-model {data}/sp.model --vocab-size 600", ["{data}/big_ids", "600"]),
    ("empty-dataset", "--data-path {data}/empty", ["{data}/empty", "holds no documents"]),
    ("ckpt-other-architecture", "--mock-data --num-layers 1 --load {ck}/ok", ["num_hidden_layers 2 (checkpoint) vs 1",
                                                                               "--num-layers 2"]),
    ("ckpt-missing-shard", "--mock-data --load {ck}/missing_shard", ["__0_0.distcp is missing",
                                                                      "no intact checkpoint"]),
    ("ckpt-corrupted-shard", "--mock-data --load {ck}/corrupt_shard", ["__0_0.distcp", "SHA-256"]),
    ("ckpt-tracker-to-nothing", "--mock-data --load {ck}/tracker_nothing", ["holds no complete checkpoint",
                                                                             "tracker: 9"]),
    ("ckpt-truncated-metadata", "--mock-data --load {ck}/trunc_meta", [".metadata", "bytes"]),
    ("ckpt-garbage-tracker", "--mock-data --load {ck}/garbage_tracker", ["latest_checkpointed_iteration.txt",
                                                                          "not an iteration number"]),
]


def _prepare_checkpoints(ck, data):
    from megatron_ascend.training.entry import run
    run(TINY.split() + ["--mock-data", "--save", f"{ck}/ok", "--train-iters", "1"], print_fn=lambda s: None)
    it = "iter_0000001"
    for name, damage in (("missing_shard", lambda p: os.remove(f"{p}/{it}/__0_0.distcp")),
                         ("corrupt_shard", lambda p: _flip(f"{p}/{it}/__0_0.distcp")),
                         ("trunc_meta", lambda p: _trunc(f"{p}/{it}/.metadata")),
                         ("tracker_nothing", lambda p: (shutil.rmtree(f"{p}/{it}"),
                                                        open(f"{p}/latest_checkpointed_iteration.txt", "w").write("9"))),
                         ("garbage_tracker", lambda p: (shutil.rmtree(f"{p}/{it}"),
                                                        open(f"{p}/latest_checkpointed_iteration.txt", "w").write("x")))):
        shutil.copytree(f"{ck}/ok", f"{ck}/{name}")
        damage(f"{ck}/{name}")


def _flip(p):
    with open(p, "r+b") as f:
        f.seek(-50, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))


def _trunc(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _run_body(data, ck):
    from megatron_ascend.training.entry import cli
    _damage_data(data)
    _prepare_checkpoints(ck, data)
    out = {}
    for cid, extra, _ in RUN_CASES:
        before_data, before_ck = _listing(data), _listing(ck)
        argv = TINY.split() + extra.format(data=data, ck=ck).split()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli(argv)
        except Exception as e:  # a traceback instead of the one line: the case fails, the others still run
            rc, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
        out[cid] = (rc, err.getvalue(), _listing(data) == before_data, _listing(ck) == before_ck)
    return out


@pytest.fixture(scope="module")
def run_results(data_dir, tmp_path_factory):
    data = str(tmp_path_factory.mktemp("run_data"))
    for f in os.listdir(data_dir):
        if f.endswith((".bin", ".idx", ".model")):
            shutil.copy(os.path.join(data_dir, f), data)
    ck = str(tmp_path_factory.mktemp("run_ck"))
    return data, ck, run_distributed(1, _run_body, data, ck, timeout=400)[0]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_data_or_checkpoint(case, run_results):
    data, ck, res = run_results
    cid, _, words = case
    rc, err, same_data, same_ck = res[cid]
    line = _one_line(err)
    assert rc == 2, (cid, rc, line)
    for w in words:
        assert w.format(data=data, ck=ck) in line, (cid, line)
    assert same_data and same_ck, (cid, "left files behind")


# ------------------------------------------------------------------------------------------------ tools
def _jsonl(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _parquet(path, table):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(table), path)
    return path


def _preprocess(tmp, inp, extra=""):
    from megatron_ascend.data.preprocess import main
    out = os.path.join(tmp, "out", "corpus")
    argv = ["--input", inp, "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", os.path.join(tmp, "sp.model"), "--no-progress"] + extra.split()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue(), os.path.join(tmp, "out")


PREPROCESS_CASES = [
    ("jsonl-malformed-line", lambda t: _jsonl(f"{t}/in.jsonl", ['{"text": "a b"}', '{"text": "c', '{"text": "d"}']),
     "", ["in.jsonl:2", "--on-bad-line skip"]),
    ("jsonl-missing-key", lambda t: _jsonl(f"{t}/in.jsonl", ['{"body": "a b"}']), "", ["in.jsonl:1", "'text'",
                                                                                        "--json-keys"]),
    ("jsonl-not-an-object", lambda t: _jsonl(f"{t}/in.jsonl", ['[1, 2]']), "", ["in.jsonl:1", "JSON object"]),
    ("input-missing", lambda t: f"{t}/none.jsonl", "", ["none.jsonl", "matches no file"]),
    ("input-empty", lambda t: _jsonl(f"{t}/in.jsonl", [""]), "", ["in.jsonl", "no document"]),
    ("parquet-missing-column", lambda t: _parquet(f"{t}/in.parquet", {"body": ["a b"]}), "",
     ["in.parquet", "'text'"]),
    ("parquet-corrupt", lambda t: open(f"{t}/bad.parquet", "wb").write(b"PAR1garbage") and f"{t}/bad.parquet", "",
     ["bad.parquet", "parquet"]),
    ("output-unwritable", lambda t: _jsonl(f"{t}/in.jsonl", ['{"text": "a b"}']), "--output-prefix /proc/ma/out",
     ["/proc/ma"]),
    ("workers-zero", lambda t: _jsonl(f"{t}/in.jsonl", ['{"text": "a b"}']), "--workers 0", ["--workers 0"]),
]


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=[c[0] for c in PREPROCESS_CASES])
def test_bad_preprocess_input(case, data_dir, tmp_path):
    cid, make, extra, words = case
    shutil.copy(os.path.join(data_dir, "sp.model"), tmp_path / "sp.model")
    inp = make(str(tmp_path))
    rc, err, out_dir = _preprocess(str(tmp_path), inp, extra)
    line = _one_line(err)
    assert rc != 0, (cid, line)
    for w in words:
        assert w in line, (cid, line)
    assert not os.path.exists(out_dir), (cid, "output directory left behind", os.listdir(out_dir))


def _tool(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    from tests.test_hf_conversion import build_hf, save_hf
    return save_hf(build_hf("v3"), str(tmp_path_factory.mktemp("hf_bad") / "hf"))


def _hf_missing_shard(src, dst):
    shutil.copytree(src, dst)
    idx = json.load(open(f"{dst}/model.safetensors.index.json"))
    os.remove(os.path.join(dst, sorted(set(idx["weight_map"].values()))[1]))


def _hf_fp8_without_scale(src, dst):
    import torch
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    idx = json.load(open(f"{dst}/model.safetensors.index.json"))
    name = next(k for k in idx["weight_map"] if k.endswith("q_a_proj.weight"))
    f = os.path.join(dst, idx["weight_map"][name])
    t = load_file(f)
    t[name] = t[name].to(torch.float8_e4m3fn)
    save_file(t, f, metadata={"format": "pt"})


TOOL_CASES = [
    ("hf-missing-safetensors", _hf_missing_shard, ["listed in the index are missing"]),
    ("hf-fp8-without-scale", _hf_fp8_without_scale, ["float8_e4m3fn", "_scale_inv is missing"]),
    ("hf-no-config", lambda s, d: (shutil.copytree(s, d), os.remove(f"{d}/config.json")), ["config.json"]),
]


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_bad_hf_directory(case, hf_tiny, tmp_path):
    from tools.convert_ckpt import main
    cid, make, words = case
    hf = str(tmp_path / "hf")
    make(hf_tiny, hf)
    out = tmp_path / "ma"
    rc, err = _tool(main, ["--direction", "hf2ma", "--load-dir", hf, "--save-dir", str(out), "--no-progress"])
    line = _one_line(err)
    assert rc == 2, (cid, line)
    for w in words:
        assert w in line, (cid, line)
    assert not out.exists() or not os.listdir(out), (cid, os.listdir(out))


def test_reshard_of_a_directory_without_checkpoint(tmp_path):
    from tools.reshard import main
    (tmp_path / "empty").mkdir()
    rc, err = _tool(main, ["--load-dir", str(tmp_path / "empty")])
    line = _one_line(err)
    assert rc == 2 and "holds no checkpoint" in line, line


def test_plan_with_no_fitting_layout_exits_nonzero():
    from tools.plan import main
    rc, err = _tool(main, ["--preset", "v3-2048-h800", "--hbm-gib", "1"])
    line = _one_line(err)
    assert rc == 1, line
