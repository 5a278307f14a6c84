"""Reference recipes (bench/reference/): the data is rebuilt byte for byte from its seed, the generated language
is what make_data.py says, the model presets equal their table and each proxy equals its full model but for the
layer count, and every recipe's layout passes the configuration checks for its device count."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench", "reference"))
sys.path.insert(0, os.path.join(REPO, "bench", "reference", "models"))

import make_data  # noqa: E402
import make_models  # noqa: E402

from megatron_ascend.data.indexed_dataset import IndexedDataset  # noqa: E402

# SHA-256 of the files of one small build (pretrain: seed 7, 40 documents, vocab 300, lengths 16..200; sft: seed 7,
# 30 conversations, vocab 300). A change here means the generator's output changed: every published run's data
# checksum changes with it, so bump make_data.VERSION (and these pins) on purpose, never silently.
PINNED = {
    "pre_text_document.bin": "f5265d14b7a4d6f355689aacf961690f84c6d75f2fe26f22cf8011a774848ba6",
    "pre_text_document.idx": "76db6f6765c3190957e8be776e7e1601db6d2a98444e16c87cc064100e36a5d0",
    "sft_input_ids_document.bin": "9cafba58b19ff3e9eb795ea7ab75d0e6561b63c71b0879b2ec7d6a82573ca8de",
    "sft_loss_mask_document.bin": "4cdba614d7d2ffa2595082418e61b160d46cc9ee6f826e44b088b9565917fed1",
}


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _build(root):
    make_data.build_pretrain(os.path.join(root, "pre"), seed=7, num_docs=40, vocab_size=300, min_len=16, max_len=200)
    make_data.build_sft(os.path.join(root, "sft"), seed=7, num_docs=30, vocab_size=300)
    return {f: _sha(os.path.join(root, f)) for f in sorted(os.listdir(root)) if f.endswith((".bin", ".idx"))}


def test_two_builds_are_byte_identical_and_pinned(tmp_path):
    a = _build(str(tmp_path / "a"))
    b = _build(str(tmp_path / "b"))
    assert len(a) == 6 and a == b
    for name, digest in PINNED.items():
        assert a[name] == digest, (name, a[name])
    # the stamp records the same hashes, and `check` rebuilds and agrees; a flipped byte is caught
    prefix = str(tmp_path / "a" / "pre")
    stamp = json.load(open(prefix + ".json"))
    assert stamp["generator"] == "ma-synth" and stamp["version"] == make_data.VERSION
    assert stamp["files"]["pre_text_document.bin"]["sha256"] == a["pre_text_document.bin"]
    assert make_data.check(prefix)
    with open(prefix + "_text_document.bin", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    assert not make_data.check(prefix)
    # another seed is other data
    c = make_data.build_pretrain(str(tmp_path / "c" / "pre"), seed=8, num_docs=40, vocab_size=300, min_len=16,
                                 max_len=200)
    assert c["files"]["pre_text_document.bin"]["sha256"] != a["pre_text_document.bin"]


def test_generated_language(tmp_path):
    st = make_data.build_pretrain(str(tmp_path / "p"), seed=3, num_docs=200, vocab_size=64, min_len=20, max_len=120)
    ds = IndexedDataset(str(tmp_path / "p_text_document"))
    assert len(ds) == 200 and ds.dtype == np.uint16
    succ, _ = make_data.markov_table(3, 64)
    total = copies = 0
    for i in range(len(ds)):
        d = ds[i].astype(np.int64)
        assert 20 <= d.size <= 120 and d[-1] == make_data.EOD and (d[:-1] >= make_data.FIRST_WORD).all()
        assert (d < 64).all()
        for p in range(1, d.size - 1):  # every token is a Markov successor of the previous one or a copy
            total += 1
            if d[p] not in succ[d[p - 1]]:
                copies += 1
                assert any(d[p] == d[p - off] for off in range(8, 72) if p - off >= 0), (i, p)
    assert st["tokens"] == int(ds.sequence_lengths.sum())
    assert 0.01 < copies / total < 0.4  # copy spans exist but the chain dominates

    make_data.build_sft(str(tmp_path / "s"), seed=3, num_docs=60, vocab_size=64)
    ids = IndexedDataset(str(tmp_path / "s_input_ids_document"))
    mask = IndexedDataset(str(tmp_path / "s_loss_mask_document"))
    perm = make_data._permutation(3, 64 - make_data.FIRST_WORD)
    seen = set()
    for i in range(len(ids)):
        x, m = ids[i].astype(np.int64), mask[i].astype(np.int64)
        task, sep = x[0], int(np.where(x == make_data.SEP)[0][0])
        prompt, resp = x[1:sep], x[sep + 1:-1]
        assert x[-1] == make_data.EOD and (m[:sep + 1] == 0).all() and (m[sep + 1:] == 1).all()
        expect = {make_data.TASK_COPY: prompt, make_data.TASK_REVERSE: prompt[::-1],
                  make_data.TASK_MAP: make_data.FIRST_WORD + perm[prompt - make_data.FIRST_WORD]}[task]
        assert np.array_equal(resp, expect)
        seen.add(int(task))
    assert seen == {2, 3, 4}
    st = make_data.build_sft(str(tmp_path / "l"), seed=3, num_docs=20, vocab_size=64, min_prompt=50, max_prompt=60)
    lengths = IndexedDataset(str(tmp_path / "l_input_ids_document")).sequence_lengths
    assert ((2 * 50 + 3 <= lengths) & (lengths <= 2 * 60 + 3)).all() and st["params"]["max_prompt"] == 60
    assert make_data.check(str(tmp_path / "l"))


def test_bad_generator_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match="too small"):
        make_data.build_pretrain(str(tmp_path / "x"), seed=1, num_docs=3, vocab_size=12)
    with pytest.raises(SystemExit, match="min-len"):
        make_data.build_pretrain(str(tmp_path / "x"), seed=1, num_docs=3, vocab_size=64, min_len=50, max_len=10)
    assert not os.path.exists(tmp_path / "x_text_document.bin")


def test_model_presets_and_proxies():
    assert make_models.main(["--check"]) == 0
    from megatron_ascend.config import ModelConfig
    for name in make_models.MODELS:
        ModelConfig.from_json_file(os.path.join(REPO, "bench", "reference", "models", f"{name}.json"))
    for proxy, full in make_models.FULL_OF.items():
        p, f = make_models.MODELS[proxy], make_models.MODELS[full]
        assert p["num_hidden_layers"] < f["num_hidden_layers"]
        differ = {k for k in set(p) | set(f) if p.get(k) != f.get(k)}
        assert differ <= {"num_hidden_layers", "first_k_dense_replace", "compress_ratios"}, differ
        if "compress_ratios" in f:
            n = p["num_hidden_layers"]
            assert p["compress_ratios"] == f["compress_ratios"][:n] + f["compress_ratios"][f["num_hidden_layers"]:]
            assert len(p["compress_ratios"]) == n + p["num_nextn_predict_layers"]


RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "bench", "reference", "recipes")) if f.endswith(".sh"))


def test_every_recipe_layout_is_valid_and_documented():
    """Each recipe's full command line (run.sh DRY_RUN=1) passes every configuration rule (build_configs) at its
    device count, without processes or devices; each header carries the plan command and its answer."""
    from megatron_ascend.arguments import build_configs
    from megatron_ascend.training.entry import parse
    assert {"cpu-tiny", "cpu-tiny-sft", "cpu-tiny-v4", "v2-lite-8", "v3-proxy-64", "v3-1024", "v4-flash-proxy-64",
            "v4-pro-proxy-64", "v4-pro-1024-sft"} <= set(RECIPES)
    env = dict(os.environ, DRY_RUN="1", PYTHONPATH=REPO)
    for r in RECIPES:
        text = open(os.path.join(REPO, "bench", "reference", "recipes", f"{r}.sh")).read()
        assert "tools/plan.py" in text and "RECIPE_VERSION=" in text, r
        out = subprocess.run(["bash", "bench/reference/run.sh", r], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, (r, out.stderr[-1500:])
        recipe_env, cmd = out.stdout.strip().splitlines()[-2:]
        meta = json.loads(recipe_env.split("=", 1)[1].strip("'"))
        assert meta["name"] == r and meta["layout"] == "plan" and meta["shortened"] is False
        words = cmd.split()
        entry = words[words.index("-m") + 1]
        stage = "pretrain" if entry.endswith("pretrain") else "sft"
        assert stage == meta["stage"]
        world = int(next(ln for ln in text.splitlines() if ln.startswith("RECIPE_DEVICES=")).split("=")[1])
        args = parse(words[words.index("-m") + 2:], stage)
        model, par, opt, train, data = build_configs(args, world)
        assert par.world_size == world and train.seq_length * (train.global_batch_size or 0) > 0
        assert model.num_hidden_layers == json.load(open(args.model_config))["num_hidden_layers"]
    bad = subprocess.run(["bash", "bench/reference/run.sh", "cpu-tiny"], cwd=REPO, capture_output=True, text=True,
                         env=dict(env, LAYOUT="nope"), timeout=60)
    assert bad.returncode == 2 and "has no layout 'nope'" in bad.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_cpu_recipe_runs_end_to_end(tmp_path):
    """bench/reference/run.sh cpu-tiny, shortened to 3 iterations: data built, torchrun on 2 CPU processes,
    metadata naming the recipe as shortened and the data files the stamp names, a checkpoint (the report it would
    write is tests/test_reports.py's subject: REPORT=0 here)."""
    env = dict(os.environ, PYTHONPATH=REPO, MAX_ITERS="3", REPORT="0", OUT=str(tmp_path / "run"), DATA_DIR=str(tmp_path / "data"),
               MASTER_PORT=_free_port(), MEGATRON_ASCEND_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(["bash", "bench/reference/run.sh", "cpu-tiny"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.load(open(tmp_path / "run" / "tensorboard" / "run_metadata.json"))
    assert meta["recipe"]["name"] == "cpu-tiny" and meta["recipe"]["shortened"] is True
    assert meta["layout"]["dp"] == 2 and meta["layout"]["distributed_optimizer"] is True
    stamp = json.load(open(tmp_path / "data" / "pretrain-v1-s1-n3000-V512" / "synth.json"))
    for name, info in stamp["files"].items():
        path = str(tmp_path / "data" / "pretrain-v1-s1-n3000-V512" / name)
        assert meta["data"]["files"][path]["sha256"] == info["sha256"]
    lines = [json.loads(x) for x in open(tmp_path / "run" / "tensorboard" / "rank_stats.jsonl")]
    assert [it for ln in lines for it in ln["iterations"]] == [1, 2, 3]
    assert "exiting at iteration 3 (exit-interval 3)" in r.stdout
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
