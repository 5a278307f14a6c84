"""A checkpoint cannot run code: DCP's pickled ``.metadata`` is read through a restricted unpickler
(checkpointing/safe_metadata.py). A crafted ``iter_*/.metadata`` whose unpickling would create a file is
refused, with one line naming the file, through the three paths that read user checkpoints: ``pretrain --load``
(entry point, in-process on one gloo rank), ``tools/convert_ckpt.py --direction ma2hf`` and
``tools/reshard.py``; the file is never created. (On the code before this change all three created it.)"""
import contextlib
import dataclasses
import io
import json
import os
import pickle

import pytest
import torch

from tests.harness import run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 1 --mock-data --train-iters 1 --eval-iters 0 --log-interval 1")


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code an attacker would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_config_dict():
    from megatron_ascend.config import ModelConfig
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                      max_position_embeddings=64, num_nextn_predict_layers=0)
    return dataclasses.asdict(cfg)


def crafted_checkpoint(root, marker):
    """A checkpoint directory that looks complete (tracker, common.json, .metadata, a .distcp) and whose
    .metadata creates ``marker`` when unpickled."""
    it = os.path.join(root, "iter_0000001")
    os.makedirs(it)
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(_CreatesFile(marker), f)
    with open(os.path.join(it, "__0_0.distcp"), "wb") as f:
        f.write(b"\0" * 64)
    common = {"format": "megatron_ascend.dcp", "format_version": 1, "iteration": 1, "layout": None,
              "has_optimizer": False, "has_rng": False, "optimizer": None, "scheduler": None, "extra_state": {},
              "model_config": _tiny_config_dict()}
    with open(os.path.join(it, "common.json"), "w") as f:
        json.dump(common, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return root


def test_restricted_unpickler_reads_real_metadata_and_refuses_globals(tmp_path):
    from megatron_ascend.checkpointing.dcp_io import Chunk, read_chunks, write_chunks
    from megatron_ascend.checkpointing.safe_metadata import load_metadata, loads_metadata
    from megatron_ascend.checkpointing import CheckpointError
    d = str(tmp_path / "ok")
    a = torch.randn(4, 6)
    write_chunks(d, [Chunk("a", (4, 6), (0, 0), a), Chunk("b", (3,), (0,), torch.ones(3, dtype=torch.bfloat16))])
    md = load_metadata(d)
    assert tuple(md.state_dict_metadata["a"].size) == (4, 6)
    assert md.state_dict_metadata["b"].properties.dtype == torch.bfloat16
    out = torch.zeros(4, 6)
    read_chunks(d, [Chunk("a", (4, 6), (0, 0), out)])
    assert torch.equal(out, a)
    marker = str(tmp_path / "pwned")
    for evil in (pickle.dumps(_CreatesFile(marker)), pickle.dumps({"x": _CreatesFile(marker)}),
                 pickle.dumps(os.system)):
        with pytest.raises(CheckpointError, match="not part of DCP's checkpoint metadata"):
            loads_metadata(evil)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError, match="does not hold DCP metadata"):
        loads_metadata(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        loads_metadata(open(os.path.join(d, ".metadata"), "rb").read()[:40])
    # a storage entry pointing outside the directory
    md.storage_data = {k: dataclasses.replace(v, relative_path="../x.distcp") for k, v in md.storage_data.items()}
    with pytest.raises(CheckpointError, match="not a file of the checkpoint directory"):
        loads_metadata(pickle.dumps(md))


def _pretrain_body(load_dir):
    from megatron_ascend.training.entry import cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli(TINY.split() + ["--load", load_dir])
    return rc, err.getvalue()


def test_crafted_metadata_runs_no_code_through_pretrain_convert_reshard(tmp_path, capsys):
    marker = str(tmp_path / "pwned")
    ck = crafted_checkpoint(str(tmp_path / "ck"), marker)
    # 1) python -m megatron_ascend.pretrain --load ck (in-process, one gloo rank)
    rc, err = run_distributed(1, _pretrain_body, ck, timeout=120)[0]
    assert not os.path.exists(marker), "pretrain --load unpickled the crafted .metadata"
    assert rc == 2 and "refers to io.open" in err and ".metadata" in err, err
    # 2) tools/convert_ckpt.py --direction ma2hf
    from tools.convert_ckpt import main as convert
    with pytest.raises(SystemExit) as e:
        convert(["--direction", "ma2hf", "--load-dir", ck, "--save-dir", str(tmp_path / "hf"), "--no-progress"])
    assert not os.path.exists(marker), "convert_ckpt ma2hf unpickled the crafted .metadata"
    assert e.value.code == 2 and ".metadata" in capsys.readouterr().err
    # 3) tools/reshard.py
    from tools.reshard import main as reshard
    with pytest.raises(SystemExit) as e:
        reshard(["--load-dir", ck])
    assert not os.path.exists(marker), "reshard unpickled the crafted .metadata"
    assert e.value.code == 2 and ".metadata" in capsys.readouterr().err
