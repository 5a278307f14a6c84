#!/usr/bin/env python
"""Data pipeline throughput: preprocessing MB/s with 1 and 2 workers, and dataloader samples/s.

    python bench/data_throughput.py                     # a stdlib-source corpus of ~16 MB, a fresh SentencePiece
    python bench/data_throughput.py --corpus-mb 64 --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR

A benchmark, never a test: it prints numbers and the 2-worker / 1-worker ratio, and asserts nothing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.data import preprocess, tokenizer_training  # noqa: E402
from megatron_ascend.data.gpt_dataset import GPTDataset  # noqa: E402
from megatron_ascend.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_ascend.data.sampler import PretrainingSampler, build_data_iterator  # noqa: E402


def make_corpus(path: str, megabytes: float) -> int:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
    want, wrote = int(megabytes * (1 << 20)), 0
    with open(path, "w", encoding="utf-8") as out:
        while wrote < want:
            for p in files:
                try:
                    text = open(p, encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                wrote += len(line.encode())
                if wrote >= want:
                    break
    return wrote


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--corpus-mb", type=float, default=16.0)
    ap.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    ap.add_argument("--tokenizer-model", default=None, help="default: train a SentencePiece model here")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="data_bench_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    size = make_corpus(corpus, a.corpus_mb)
    print(f"corpus: {corpus} ({size / (1 << 20):.1f} MiB of stdlib sources)")
    model = a.tokenizer_model
    if model is None:
        t = time.time()
        sents = list(tokenizer_training.iter_corpus([corpus]))[:200000]
        model = tokenizer_training.train_sentencepiece(sents, os.path.join(work, "sp"), a.vocab_size,
                                                       num_threads=os.cpu_count() or 1)
        print(f"tokenizer: trained SentencePiece vocab {a.vocab_size} on {len(sents)} lines in {time.time() - t:.1f} s")
    rates = {}
    prefix = None
    for w in a.workers:
        prefix = os.path.join(work, f"out_w{w}")
        stats = preprocess.run(preprocess.get_parser().parse_args(
            ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", a.tokenizer_type,
             "--tokenizer-model", model, "--append-eod", "--workers", str(w), "--no-progress"]))
        mb = stats["bytes"] / (1 << 20)
        rates[w] = mb / stats["seconds"]
        print(f"preprocess workers={w}: {mb:.1f} MiB, {stats['documents']} docs, {stats['tokens']} tokens in "
              f"{stats['seconds']:.2f} s -> {rates[w]:.2f} MiB/s, {stats['documents'] / stats['seconds']:.0f} docs/s, "
              f"{stats['tokens'] / stats['seconds'] / 1e6:.2f} M tokens/s")
    if 1 in rates and 2 in rates:
        print(f"preprocess speed-up 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x  (on {os.cpu_count()} cores)")

    ds_idx = IndexedDataset(prefix + "_text_document")
    n = a.batches * a.micro_batch_size
    t = time.time()
    ds = GPTDataset(ds_idx, (0, len(ds_idx)), n, a.seq_length, seed=1234, cache_dir=os.path.join(work, "cache"))
    print(f"GPTDataset indices: {len(ds)} samples of {a.seq_length} ({ds.num_epochs} epochs of "
          f"{ds.tokens_per_epoch} tokens) built in {time.time() - t:.3f} s")
    for nw in (0, 2):
        it = build_data_iterator(ds, PretrainingSampler(len(ds), 0, a.micro_batch_size, 0, 1), num_workers=nw)
        next(it)  # worker start-up is not throughput
        t, count = time.time(), 0
        for _ in range(a.batches - 1):
            try:
                batch = next(it)
            except StopIteration:
                break
            count += batch["tokens"].shape[0]
        dt = time.time() - t
        print(f"dataloader num_workers={nw}: {count / dt:.0f} samples/s, {count * a.seq_length / dt / 1e6:.2f} M "
              f"tokens/s (micro-batch {a.micro_batch_size} x {a.seq_length})")
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
