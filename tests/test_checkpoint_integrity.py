"""Checkpoint integrity and fit, checked before any tensor is read (checkpointing/integrity.py, selection.py,
compat.py), each failure one line naming the file or values and the fix:

* every save records each file's size and SHA-256 (hashed while DCP writes it: equal to a re-read) and
  common.json's own checksum; a bit-flipped / truncated / missing shard, a truncated or edited common.json, a
  truncated .metadata in the newest checkpoint is skipped for the newest intact one with a warning naming the
  file, or refused with ``fallback=False`` (--no-ckpt-fallback); a tracker pointing at nothing falls back too;
* through the entry point on 2 gloo ranks (the hashing spread over them): a 2-layer checkpoint into
  --num-layers 1, an MTP checkpoint into --mtp-num-layers 0, and another LR schedule are refused (the schedule
  is accepted with --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler, each giving its LR);
  a corrupt newest checkpoint is skipped by the trainer; an unwritable --save is refused before training; a
  HuggingFace directory given to --load names the conversion command.

On the code before this change the corrupted checkpoints loaded (or crashed with a traceback) and the
mismatched model / schedule resumed silently."""
import contextlib
import io
import json
import os
import shutil

import pytest
import torch

from tests.harness import run_distributed


def _toy(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(2, 32)).sum().backward()
    opt.step()
    return m, opt


def _flip_byte(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _edit_common(path):
    c = json.load(open(path))
    c["extra_state"] = {"consumed_train_samples": 12345}
    json.dump(c, open(path, "w"), indent=1, sort_keys=True)


CORRUPTIONS = {
    "bit flip in a shard": ("__0_0.distcp", _flip_byte, "SHA-256"),
    "truncated shard": ("__0_0.distcp", _truncate, "bytes"),
    "missing shard": ("__0_0.distcp", os.remove, "missing"),
    "truncated common.json": ("common.json", _truncate, "not valid JSON"),
    "edited common.json": ("common.json", _edit_common, "checksum"),
    "truncated .metadata": (".metadata", _truncate, "bytes"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from megatron_ascend.checkpointing import save_checkpoint
    root = str(tmp_path_factory.mktemp("integrity") / "ck")
    params = {}
    for it in (1, 2):
        m, opt = _toy(it)
        save_checkpoint(root, it, [m], opt)
        params[it] = [p.detach().clone() for p in m.parameters()]
    return root, params


def test_records_match_the_files(two_checkpoints):
    from megatron_ascend.checkpointing.integrity import file_record
    root, _ = two_checkpoints
    d = os.path.join(root, "iter_0000002")
    common = json.load(open(os.path.join(d, "common.json")))
    assert set(common["files"]) == {".metadata", "__0_0.distcp"}
    for name, rec in common["files"].items():  # streamed while writing == read back
        assert file_record(os.path.join(d, name)) == rec, name
    assert len(common["common_sha256"]) == 64 and common["model_config"] is None


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_is_skipped_or_refused(two_checkpoints, tmp_path, caplog, kind):
    from megatron_ascend.checkpointing import CheckpointError, load_checkpoint
    src, params = two_checkpoints
    root = str(tmp_path / "ck")
    shutil.copytree(src, root)
    name, damage, words = CORRUPTIONS[kind]
    bad = os.path.join(root, "iter_0000002", name)
    damage(bad)
    m, opt = _toy(7)
    with caplog.at_level("WARNING"):
        it, _ = load_checkpoint(root, [m], opt)
    assert it == 1, kind
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params[1])), kind
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert bad in warned and words in warned, warned
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(root, [m], opt, fallback=False)
    msg = str(e.value)
    assert bad in msg and words in msg and "--no-ckpt-fallback" in msg and "\n" not in msg, msg


def test_tracker_pointing_at_nothing_falls_back(two_checkpoints, tmp_path, caplog):
    from megatron_ascend.checkpointing import load_checkpoint
    src, params = two_checkpoints
    root = str(tmp_path / "ck")
    shutil.copytree(src, root)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("9")
    m, opt = _toy(7)
    with caplog.at_level("WARNING"):
        it, _ = load_checkpoint(root, [m], opt)
    assert it == 2 and "incomplete/missing 9" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params[2]))


# ------------------------------------------------------------------------------------------ entry point, 2 ranks
TINY = ("--hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 --kv-lora-rank 16 "
        "--qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 --moe-ffn-hidden-size 16 "
        "--moe-router-topk 2 --first-k-dense-replace 1 --vocab-size 128 --make-vocab-size-divisible-by 1 "
        "--max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 --global-batch-size 2 --mock-data "
        "--eval-iters 0 --log-interval 1 --lr 1e-3 --lr-warmup-iters 1 --seed 3")


def _cli(argv):
    from megatron_ascend.training.entry import cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli(argv)
    return rc, err.getvalue().strip()


def _run(argv):
    from megatron_ascend.training.entry import run
    return run(argv, print_fn=lambda s: None)


def _entry_body(root, hf_dir):
    a = TINY.split()
    out = {}
    ck2, ckmtp = f"{root}/l2", f"{root}/mtp"
    _run(a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 2 --save {ck2}".split())
    _run(a + f"--num-layers 2 --mtp-num-layers 1 --train-iters 2 --save {ckmtp}".split())
    out["layers"] = _cli(a + f"--num-layers 1 --mtp-num-layers 0 --train-iters 3 --load {ck2}".split())
    out["mtp"] = _cli(a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 2 --load {ckmtp}".split())
    sched = a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 4 --load {ck2}".split()
    out["sched"] = _cli(sched)
    r = _run(sched + ["--override-opt_param-scheduler"])
    out["sched_override"] = (sorted(r.losses), r.iteration)
    from megatron_ascend.training.trainer import Trainer
    from megatron_ascend.training.entry import parse
    lrs = {}
    for flag in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        tr = Trainer(parse(sched + [flag], "pretrain"), print_fn=lambda s: None)
        lrs[flag] = (tr.iteration, tr.scheduler.decay_steps, tr.scheduler.get_lr())
        tr.close()
    out["lrs"] = lrs
    # a corrupt newest checkpoint: the trainer resumes from the older intact one
    ckc = f"{root}/corrupt"
    _run(a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 3 --save-interval 1 --exit-interval 2 "
             f"--save {ckc}".split())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shard = sorted(n for n in os.listdir(f"{ckc}/iter_0000002") if n.endswith(".distcp"))[-1]
        _flip_byte(f"{ckc}/iter_0000002/{shard}")
        out["flipped"] = f"{ckc}/iter_0000002/{shard}"
    torch.distributed.barrier()
    r = _run(a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 3 --load {ckc}".split())
    out["corrupt_resume"] = sorted(r.losses)
    out["corrupt_strict"] = _cli(a + f"--num-layers 2 --mtp-num-layers 0 --train-iters 3 --load {ckc} "
                                     f"--no-ckpt-fallback".split())
    # paths
    out["unwritable"] = _cli(a + "--num-layers 2 --train-iters 2 --save /proc/ma_ckpt".split())
    out["hf"] = _cli(a + f"--num-layers 2 --train-iters 2 --load {hf_dir}".split())
    out["missing_load"] = _cli(a + f"--num-layers 2 --train-iters 2 --load {root}/nope".split())
    return out


def test_entry_point_refuses_mismatch_and_corruption(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    res = run_distributed(2, _entry_body, str(tmp_path), str(hf), timeout=400)
    o = res[0]
    rc, err = o["layers"]
    assert rc == 2 and err.count("\n") == 0, err
    assert "num_hidden_layers 2 (checkpoint) vs 1 (this run)" in err and "--num-layers 2" in err, err
    assert "model.layers.1." in err, err
    rc, err = o["mtp"]
    assert rc == 2 and "num_nextn_predict_layers 1 (checkpoint) vs 0" in err and "--mtp-num-layers 1" in err, err
    rc, err = o["sched"]
    assert rc == 2 and "lr_decay_steps: 2 -> 4" in err and "--override-opt_param-scheduler" in err \
        and "--use-checkpoint-opt_param-scheduler" in err, err
    assert o["sched_override"] == ([3, 4], 4)
    lr_new = o["lrs"]["--override-opt_param-scheduler"]
    lr_ckpt = o["lrs"]["--use-checkpoint-opt_param-scheduler"]
    assert lr_new[:2] == (2, 4) and lr_ckpt[:2] == (2, 2)
    assert lr_ckpt[2] == 0.0 and lr_new[2] > 0.0  # the 2-iteration cosine ended at min-lr 0; the 4-iteration one not
    assert o["corrupt_resume"] == [2, 3]  # resumed at iteration 1: the newest (2) was skipped
    rc, err = o["corrupt_strict"]
    assert rc == 2 and o["flipped"] in err and "SHA-256" in err and "--no-ckpt-fallback" in err, err
    rc, err = o["unwritable"]
    assert rc == 2 and "--save '/proc/ma_ckpt' is not writable" in err, err
    rc, err = o["hf"]
    assert rc == 2 and "HuggingFace model directory" in err and "tools/convert_ckpt.py --direction hf2ma" in err, err
    rc, err = o["missing_load"]
    assert rc == 2 and "does not exist" in err, err
    for name in ("layers", "mtp", "sched", "corrupt_strict", "unwritable", "hf"):
        assert res[1][name][0] == 2 and res[1][name][1] == "", (name, res[1][name])  # rank 1 prints nothing
    assert not os.path.exists("/proc/ma_ckpt")


def test_hf_import_compares_mtp_copies_with_main_embedding_and_head(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from megatron_ascend.checkpointing import CheckpointError
    from megatron_ascend.checkpointing.dcp_io import Chunk, read_chunks
    from megatron_ascend.checkpointing.hf import convert_hf_to_ma
    from tests.test_hf_conversion import build_hf, save_hf
    hf_dir = save_hf(build_hf("v3"), str(tmp_path / "hf"), mtp=True)
    L = json.load(open(os.path.join(hf_dir, "config.json")))["num_hidden_layers"]
    # equal copies (the hub's case): converts without a word
    convert_hf_to_ma(hf_dir, str(tmp_path / "ok"), progress=False)
    mtp_file = os.path.join(hf_dir, "model-mtp.safetensors")
    t = load_file(mtp_file)
    name = f"model.layers.{L}.shared_head.head.weight"
    t[name][3, 5] += 1.0
    save_file(t, mtp_file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        convert_hf_to_ma(hf_dir, str(tmp_path / "bad"), progress=False)
    msg = str(e.value)
    assert name in msg and "lm_head.weight" in msg and "row 3" in msg and "--mtp-copy-mismatch keep-main" in msg, msg
    assert not os.path.exists(tmp_path / "bad" / "release")
    from tools.convert_ckpt import main
    main(["--direction", "hf2ma", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "kept"), "--no-progress",
          "--mtp-copy-mismatch", "keep-main"])
    assert f"warning: the MTP copy {name} differs from lm_head.weight" in capsys.readouterr().out
    head = load_file(os.path.join(hf_dir, json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
                                  ["weight_map"]["lm_head.weight"]))["lm_head.weight"]
    got = torch.empty_like(head)
    read_chunks(str(tmp_path / "kept" / "release"), [Chunk("lm_head.weight", tuple(head.shape), (0, 0), got)])
    assert torch.equal(got, head)  # the main head was kept


def test_interrupted_first_save_and_swapped_out_copy(two_checkpoints, tmp_path):
    """A kill during the very first save leaves only ``iter_N.tmp``: with --load == --save (partial_ok) that is a
    fresh start, otherwise an error. A kill between the two renames of a re-saved iteration leaves the complete
    copy as ``iter_N.old``: it is loaded."""
    from megatron_ascend.checkpointing import CheckpointError, checkpoint_candidates, load_checkpoint
    src, params = two_checkpoints
    root = str(tmp_path / "first")
    os.makedirs(root)
    shutil.copytree(os.path.join(src, "iter_0000001"), os.path.join(root, "iter_0000001.tmp"))
    assert checkpoint_candidates(root, partial_ok=True) == []
    with pytest.raises(CheckpointError, match="interrupted before its first commit"):
        checkpoint_candidates(root)
    root = str(tmp_path / "swap")
    shutil.copytree(src, root)
    os.rename(os.path.join(root, "iter_0000002"), os.path.join(root, "iter_0000002.old"))
    m, opt = _toy(7)
    assert load_checkpoint(root, [m], opt)[0] == 2
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), params[2]))
