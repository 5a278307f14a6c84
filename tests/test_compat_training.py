"""Foreign flags that change behaviour, through the entry point a user runs (megatron_ascend.pretrain's code path
in-process on 2 gloo ranks): sample-based training and LR schedule (--train-samples, --lr-*-samples,
--lr-warmup-init), --eod-mask-loss, --data-cache-path, --no-save-optim / --no-save-rng / --async-save,
--distributed-timeout-minutes reaching the process-group set-up, MindSpeed's tokenizer spellings, and
--enable-hf2mg-convert loading a HuggingFace directory."""
import math
import os

import pytest
import torch

from tests.harness import run_distributed

MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
         "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
         "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
         "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --make-vocab-size-divisible-by 1 "
         "--max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 --eval-iters 0 --log-interval 100")


def _schedule_body(tok_dir, data_prefix, root):
    from megatron_ascend import platform
    from megatron_ascend.checkpointing import find_checkpoint, read_common
    from megatron_ascend.training import parts
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    seen = []
    real = platform.init_distributed
    def spy(timeout_minutes=None, options=None):
        seen.append(options.timeout_minutes if timeout_minutes is None else timeout_minutes)
        return real(timeout_minutes, options)
    platform.init_distributed = spy
    try:
        argv = (MODEL + f" --tokenizer-type PretrainedFromHF --tokenizer-name-or-path {tok_dir} "
                f"--data-path {data_prefix} --split 100,0,0 --global-batch-size 4 --train-samples 22 "
                f"--lr-warmup-samples 4 --lr-decay-samples 24 --lr 1e-3 --min-lr 1e-4 --lr-warmup-init 1e-4 "
                f"--eod-mask-loss --data-cache-path {root}/cache --distributed-timeout-minutes 7 "
                f"--save {root}/ck --save-interval 100 --no-save-optim --no-save-rng --async-save").split()
        tr = Trainer(parse(argv, "pretrain"), print_fn=lambda s: None)
        res = tr.train()
        lr = parts.current_lr(tr.optimizer, tr.scheduler)
        ds = tr.datasets.train
        eod = tr.tokenizer.eod
        masks_ok = all(bool(((ds[i]["tokens"] == eod) == (ds[i]["loss_mask"] == 0)).all()) for i in range(len(ds)))
        n_eod = sum(int((ds[i]["tokens"] == eod).sum()) for i in range(len(ds)))
        tr.close()
        path, _ = find_checkpoint(f"{root}/ck")
        common = read_common(path)
        return dict(timeout=seen, iters=res.iteration, samples=res.consumed_samples, lr=lr, masks_ok=masks_ok,
                    n_eod=n_eod, cache=sorted(os.listdir(f"{root}/cache")), saved=res.saved,
                    has_optim=common["has_optimizer"], has_rng=common["has_rng"])
    finally:
        platform.init_distributed = real


def test_sample_schedule_eod_mask_cache_and_save_flags(tmp_path):
    from megatron_ascend.data import preprocess, tokenizer_training as tt
    from tests.test_data_common import stdlib_texts, write_jsonl
    texts = stdlib_texts(12, 1500)
    tok = tt.train_hf_bpe([ln for t in texts for ln in t.split("\n") if ln.strip()], str(tmp_path / "tok"),
                          vocab_size=300)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    assert preprocess.main(["--input", src, "--output-prefix", str(tmp_path / "d"), "--tokenizer-type",
                            "PretrainedFromHF", "--tokenizer-name-or-path", tok, "--append-eod", "--no-progress"]) == 0
    out = run_distributed(2, _schedule_body, tok, str(tmp_path / "d_text_document"), str(tmp_path), timeout=300)
    for r in out:
        assert r["timeout"] == [7.0]  # --distributed-timeout-minutes reached platform.init_distributed
        assert r["iters"] == 22 // 4 and r["samples"] == 20  # Megatron: train_iters = train_samples // gbs
        n, warm, decay = 20, 4, 24  # Megatron's schedule in samples after 5 steps of 4 samples
        want = 1e-4 + 0.5 * (math.cos(math.pi * (n - warm) / (decay - warm)) + 1) * (1e-3 - 1e-4)
        assert r["lr"] == pytest.approx(want, rel=1e-12)
        assert r["masks_ok"] and r["n_eod"] > 0  # loss mask 0 exactly where the input is eod
        assert any(f.startswith(tuple("0123456789abcdef")) and "GPTDataset-train" in f for f in r["cache"])
        assert r["saved"] == [5] and r["has_optim"] is False and r["has_rng"] is False
    assert os.path.isdir(tmp_path / "ck" / "iter_0000005")


def _hf_body(argvs):
    from megatron_ascend.config import ConfigError
    from megatron_ascend.training.entry import run
    out = []
    for argv in argvs:
        try:
            out.append(run(argv.split(), "pretrain", print_fn=lambda s: None).losses[1]["lm loss"])
        except ConfigError as e:
            out.append(str(e))
    return out


def test_enable_hf2mg_convert_loads_the_hf_directory(tmp_path):
    from tests.test_hf_conversion import build_hf, save_hf
    hf = save_hf(build_hf("v3"), str(tmp_path / "hf"), mtp=True)
    base = (f"--model-config {hf}/config.json --vocab-size 256 --make-vocab-size-divisible-by 1 --seq-length 16 "
            f"--micro-batch-size 1 --global-batch-size 2 --train-iters 1 --eval-iters 0 --mock-data --lr 1e-3")
    argvs = [base + f" --enable-hf2mg-convert --model-type-hf deepseek3 --load {hf}",  # MindSpeed's way
             base + f" --load {hf}/megatron_ascend_hf2ma",  # what tools/convert_ckpt.py would have written
             base,  # random initialisation
             base + f" --enable-hf2mg-convert --load {tmp_path}"]  # not an HF directory
    a, b = run_distributed(2, _hf_body, argvs, timeout=300)
    assert a == b
    from_hf, converted, fresh, err = a
    assert os.path.isfile(tmp_path / "hf" / "megatron_ascend_hf2ma" / "latest_checkpointed_iteration.txt")
    assert from_hf == converted  # the same weights as converting first with the tool
    assert from_hf != fresh  # and not the random initialisation
    assert "holds no HuggingFace checkpoint" in err
