#!/usr/bin/env python
"""Reference data: a synthetic language generated from a seed, byte for byte the same on every machine.

    python bench/reference/make_data.py pretrain --output-prefix DIR/synth --seed 1 --num-docs 4000 --vocab-size 512
    python bench/reference/make_data.py sft --output-prefix DIR/synth_sft --seed 1 --num-docs 2000 --vocab-size 512
    python bench/reference/make_data.py check DIR/synth          # rebuild from the stamp and compare the hashes

Procedure ``ma-synth`` version 1 (GENERATOR, VERSION below; a change to any rule here bumps VERSION):

* Randomness is counter-based: the draw for (stream, i, j) is ``mix(seed, stream, i, j)``, SplitMix64's
  finaliser over 64-bit integers (numpy uint64 arithmetic, wrapping mod 2**64). No library random generator is
  used, so neither the Python nor the numpy version can change a byte.
* Vocabulary: ids ``[0, V)``; 0 = end of document (EOD, also the padding id), 1 = SEP, 2..4 = SFT task markers,
  ``FIRST_WORD`` (8) .. V-1 = words.
* Language: a first-order Markov chain over the words. Word ``t`` has ``K`` = 16 successors
  ``FIRST_WORD + mix(seed, SUCC, t, j) % (V - FIRST_WORD)`` chosen with integer Zipf weights
  ``floor(2**20 / (j + 1))`` (thresholds over 24 random bits). Documents add *copy spans*: at each position
  (after the 16th) with probability 40/1024 the next 4..15 tokens repeat the tokens found 8..71 positions back
  (an induction-style dependency only attention can learn). A document of length ``L`` (uniform in
  ``[min_len, max_len]``) starts with a uniform word and ends with EOD; its tokens count EOD.
* Pretraining files: ``PREFIX_text_document.bin/.idx`` (the Megatron indexed format, one sequence per
  document, uint16 below 65536 ids else int32), as ``tools/preprocess_data.py --append-eod`` would write them.
* SFT files: ``PREFIX_input_ids_document`` + ``PREFIX_loss_mask_document`` (what ``preprocess_data.py --sft``
  writes): ``[task, prompt..., SEP, response..., EOD]`` with the loss on the response and EOD. The prompt is a
  Markov-language sentence of 8..40 words (``--min-prompt`` / ``--max-prompt``); the response is the prompt copied (task 2), reversed (task 3) or
  mapped word by word through a fixed permutation of the words (task 4).
* A stamp ``PREFIX.json`` records the generator, version, parameters and the SHA-256 of every file written;
  ``check`` rebuilds into a temporary directory and compares.

Every run of the reference recipes (bench/reference/) builds its data with this script, so a run on Ascend and a
run on NVIDIA read the same bytes; run metadata (monitoring/run_metadata.py) records the files' checksum.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ascend.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

GENERATOR = "ma-synth"
VERSION = 1
EOD, SEP, TASK_COPY, TASK_REVERSE, TASK_MAP = 0, 1, 2, 3, 4
FIRST_WORD = 8
SUCCESSORS = 16
COPY_PER_1024 = 40
COPY_MIN_POS = 16
STREAM_SUCC, STREAM_START, STREAM_LEN, STREAM_TOK, STREAM_COPY, STREAM_PERM, STREAM_TASK = range(1, 8)
TEXT_SUFFIX = "_text_document"
SFT_SUFFIXES = ("_input_ids_document", "_loss_mask_document")

_M64 = (1 << 64) - 1


def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea, Flood 2014) on uint64 arrays."""
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix(seed: int, stream: int, i, j=0) -> np.ndarray:
    """The 64-bit draw for (seed, stream, i, j); i and j broadcast (int arrays)."""
    with np.errstate(over="ignore"):
        z = _splitmix(_u64(seed & _M64) ^ _splitmix(_u64(stream)))
        z = _splitmix(z ^ _u64(i))
        return _splitmix(z ^ _u64(j))


def _words(vocab: int) -> int:
    if vocab < FIRST_WORD + SUCCESSORS:
        raise SystemExit(f"error: --vocab-size {vocab} is too small; the language needs at least "
                         f"{FIRST_WORD + SUCCESSORS} ids")
    return vocab - FIRST_WORD


def markov_table(seed: int, vocab: int):
    """(successors [V, K] int64, cumulative thresholds [K] over 2**24): the language's transition rule."""
    n = _words(vocab)
    t = np.arange(vocab, dtype=np.uint64)[:, None]
    j = np.arange(SUCCESSORS, dtype=np.uint64)[None, :]
    succ = (FIRST_WORD + (mix(seed, STREAM_SUCC, t, j) % np.uint64(n))).astype(np.int64)
    weights = np.array([(1 << 20) // (k + 1) for k in range(SUCCESSORS)], dtype=np.int64)
    cum = np.cumsum(weights)
    thresholds = (cum * (1 << 24)) // cum[-1]  # integer: the same on every machine
    return succ, thresholds


def markov_documents(seed: int, vocab: int, doc_ids: np.ndarray, lengths: np.ndarray, copy_spans: bool = True,
                     table=None) -> List[np.ndarray]:
    """Documents ``doc_ids`` of ``lengths`` tokens each (the last one EOD), generated together position by
    position; ``table`` is markov_table(seed, vocab) when the caller has it."""
    succ, thr = table if table is not None else markov_table(seed, vocab)
    n = _words(vocab)
    docs = np.asarray(doc_ids, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    count = docs.size
    body = lengths - 1  # the last token is EOD
    width = int(body.max()) if count else 0
    buf = np.zeros((count, width + 1), dtype=np.int64)
    rows = np.arange(count)
    prev = (FIRST_WORD + (mix(seed, STREAM_START, docs) % np.uint64(n))).astype(np.int64)
    copy_left = np.zeros(count, dtype=np.int64)
    copy_off = np.zeros(count, dtype=np.int64)
    if width:
        buf[:, 0] = prev
    for p in range(1, width):
        r = mix(seed, STREAM_TOK, docs, p)
        choice = np.searchsorted(thr, (r & np.uint64((1 << 24) - 1)).astype(np.int64), side="right")
        tok = succ[prev, np.minimum(choice, SUCCESSORS - 1)]
        if copy_spans and p >= COPY_MIN_POS:
            c = mix(seed, STREAM_COPY, docs, p)
            start = (copy_left == 0) & ((c & np.uint64(1023)).astype(np.int64) < COPY_PER_1024)
            off = np.minimum(8 + ((c >> np.uint64(10)) % np.uint64(64)).astype(np.int64), p)
            length = 4 + ((c >> np.uint64(20)) % np.uint64(12)).astype(np.int64)
            copy_off = np.where(start, off, copy_off)
            copy_left = np.where(start, length, copy_left)
            copying = copy_left > 0
            tok = np.where(copying, buf[rows, p - np.where(copying, copy_off, 0)], tok)
            copy_left = np.where(copying, copy_left - 1, copy_left)
        buf[:, p] = tok
        prev = tok
    out = []
    for k in range(count):
        d = buf[k, :body[k] + 1].copy()
        d[body[k]] = EOD
        out.append(d)
    return out


def _dtype(vocab: int):
    return np.uint16 if vocab <= 65536 else np.int32


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_stamp(prefix: str, kind: str, params: dict, files: List[str], stats: dict) -> dict:
    stamp = {"generator": GENERATOR, "version": VERSION, "kind": kind, "params": params,
             "files": {os.path.basename(f): {"bytes": os.path.getsize(f), "sha256": _sha256(f)} for f in files},
             **stats}
    tmp = prefix + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(stamp, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, prefix + ".json")
    return stamp


def _chunks(num: int, size: int = 4096):
    for first in range(0, num, size):
        yield first, min(size, num - first)


def build_pretrain(prefix: str, seed: int, num_docs: int, vocab_size: int, min_len: int = 64,
                   max_len: int = 1024) -> dict:
    """Write PREFIX_text_document.bin/.idx and the stamp PREFIX.json; return the stamp."""
    _check_args(num_docs, min_len, max_len)
    out = prefix + TEXT_SUFFIX
    b = IndexedDatasetBuilder(out + ".bin", dtype=_dtype(vocab_size))
    tokens = 0
    table = markov_table(seed, vocab_size)
    try:
        for first, count in _chunks(num_docs):
            ids = np.arange(first, first + count, dtype=np.uint64)
            lengths = min_len + (mix(seed, STREAM_LEN, ids) % np.uint64(max_len - min_len + 1)).astype(np.int64)
            for d in markov_documents(seed, vocab_size, ids, lengths, table=table):
                b.add_document(d, [d.size])
                tokens += int(d.size)
        b.finalize(out + ".idx")
    except BaseException:
        b.abort()
        raise
    params = {"seed": seed, "num_docs": num_docs, "vocab_size": vocab_size, "min_len": min_len, "max_len": max_len}
    return _write_stamp(prefix, "pretrain", params, [out + ".bin", out + ".idx"],
                        {"tokens": tokens, "data_path": os.path.basename(out)})


SFT_ID_OFFSET = 1 << 40  # SFT prompts draw from document ids far from the pretraining documents


def sft_conversations(seed: int, vocab: int, first: int, count: int, table, min_prompt: int = 8,
                      max_prompt: int = 40) -> List[tuple]:
    """Conversations ``first .. first + count - 1``: (ids, loss mask) of [task, prompt..., SEP, response..., EOD]."""
    n = _words(vocab)
    conv = np.arange(first, first + count, dtype=np.uint64)
    r = mix(seed, STREAM_TASK, conv)
    tasks = (TASK_COPY + r % np.uint64(3)).astype(np.int64)
    lengths = min_prompt + ((r >> np.uint64(8)) % np.uint64(max_prompt - min_prompt + 1)).astype(np.int64)
    prompts = markov_documents(seed, vocab, conv + np.uint64(SFT_ID_OFFSET), lengths + 1, copy_spans=False,
                               table=table)
    perm = _permutation(seed, n)
    out = []
    for task, prompt in zip(tasks.tolist(), prompts):
        prompt = prompt[:-1]  # drop the EOD
        if task == TASK_COPY:
            resp = prompt.copy()
        elif task == TASK_REVERSE:
            resp = prompt[::-1].copy()
        else:
            resp = FIRST_WORD + perm[prompt - FIRST_WORD]
        ids = np.concatenate([[task], prompt, [SEP], resp, [EOD]]).astype(np.int64)
        mask = np.zeros(ids.size, dtype=np.int64)
        mask[2 + prompt.size:] = 1  # response and EOD
        out.append((ids, mask))
    return out


_PERM_CACHE: Dict[tuple, np.ndarray] = {}


def _permutation(seed: int, n: int) -> np.ndarray:
    """A fixed permutation of the n words: argsort of their draws (ties broken by index, stable sort)."""
    key = (seed, n)
    if key not in _PERM_CACHE:
        _PERM_CACHE[key] = np.argsort(mix(seed, STREAM_PERM, np.arange(n, dtype=np.uint64)), kind="stable")
    return _PERM_CACHE[key]


def build_sft(prefix: str, seed: int, num_docs: int, vocab_size: int, min_prompt: int = 8,
              max_prompt: int = 40) -> dict:
    """Write PREFIX_input_ids_document / PREFIX_loss_mask_document (.bin/.idx) and PREFIX.json."""
    _check_args(num_docs, 2, 2)
    if not 1 <= min_prompt <= max_prompt:
        raise SystemExit(f"error: prompt lengths [{min_prompt}, {max_prompt}] need 1 <= --min-prompt <= --max-prompt")
    ids_p, mask_p = (prefix + s for s in SFT_SUFFIXES)
    bi = IndexedDatasetBuilder(ids_p + ".bin", dtype=_dtype(vocab_size))
    bm = IndexedDatasetBuilder(mask_p + ".bin", dtype=np.uint8)
    table = markov_table(seed, vocab_size)
    tokens = trainable = 0
    try:
        for first, count in _chunks(num_docs):
            for ids, mask in sft_conversations(seed, vocab_size, first, count, table, min_prompt, max_prompt):
                bi.add_document(ids, [ids.size])
                bm.add_document(mask, [mask.size])
                tokens += int(ids.size)
                trainable += int(mask.sum())
        bi.finalize(ids_p + ".idx")
        bm.finalize(mask_p + ".idx")
    except BaseException:
        bi.abort()
        bm.abort()
        raise
    params = {"seed": seed, "num_docs": num_docs, "vocab_size": vocab_size}
    if (min_prompt, max_prompt) != (8, 40):
        params.update(min_prompt=min_prompt, max_prompt=max_prompt)
    return _write_stamp(prefix, "sft", params, [ids_p + ".bin", ids_p + ".idx", mask_p + ".bin", mask_p + ".idx"],
                        {"tokens": tokens, "trainable_tokens": trainable, "data_path": os.path.basename(prefix)})


def _check_args(num_docs: int, min_len: int, max_len: int) -> None:
    if num_docs < 1:
        raise SystemExit(f"error: --num-docs {num_docs} must be >= 1")
    if not 2 <= min_len <= max_len:
        raise SystemExit(f"error: document lengths [{min_len}, {max_len}] need 2 <= --min-len <= --max-len")


def build_from_stamp(prefix: str, stamp: dict) -> dict:
    if stamp.get("generator") != GENERATOR:
        raise SystemExit(f"error: {prefix}.json was not written by {GENERATOR}")
    if stamp.get("version") != VERSION:
        raise SystemExit(f"error: {prefix}.json is {GENERATOR} version {stamp.get('version')}, this script writes "
                         f"version {VERSION}; check out the library version that wrote it")
    p = stamp["params"]
    if stamp["kind"] == "pretrain":
        return build_pretrain(prefix, p["seed"], p["num_docs"], p["vocab_size"], p["min_len"], p["max_len"])
    return build_sft(prefix, p["seed"], p["num_docs"], p["vocab_size"], p.get("min_prompt", 8),
                     p.get("max_prompt", 40))


def check(prefix: str) -> bool:
    """Rebuild PREFIX from its stamp in a temporary directory; True when every file's hash matches."""
    with open(prefix + ".json") as f:
        stamp = json.load(f)
    tmp = tempfile.mkdtemp(prefix="ma-synth-check-")
    try:
        again = build_from_stamp(os.path.join(tmp, os.path.basename(prefix)), stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = True
    for name, info in stamp["files"].items():
        now = _sha256(os.path.join(os.path.dirname(os.path.abspath(prefix)), name))
        if not (now == info["sha256"] == again["files"][name]["sha256"]):
            ok = False
            print(f"MISMATCH {name}: stamp {info['sha256'][:16]} file {now[:16]} rebuilt "
                  f"{again['files'][name]['sha256'][:16]}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/reference/make_data.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    for kind in ("pretrain", "sft"):
        s = sub.add_parser(kind, help=f"write the {kind} files", allow_abbrev=False)
        s.add_argument("--output-prefix", required=True)
        s.add_argument("--seed", type=int, default=1)
        s.add_argument("--num-docs", type=int, required=True, help="documents (conversations for sft)")
        s.add_argument("--vocab-size", type=int, required=True, help="ids [0, V); words from id 8")
        if kind == "pretrain":
            s.add_argument("--min-len", type=int, default=64, help="shortest document, tokens incl. EOD")
            s.add_argument("--max-len", type=int, default=1024, help="longest document, tokens incl. EOD")
        else:
            s.add_argument("--min-prompt", type=int, default=8, help="shortest prompt, words")
            s.add_argument("--max-prompt", type=int, default=40, help="longest prompt, words (a conversation is "
                                                                      "2 x prompt + 3 ids)")
    c = sub.add_parser("check", help="rebuild from PREFIX.json and compare every file's SHA-256")
    c.add_argument("prefix")
    a = p.parse_args(argv)
    if a.cmd == "check":
        ok = check(a.prefix)
        print(f"{a.prefix}: {'reproduced byte for byte' if ok else 'DIFFERS from its stamp'} "
              f"({GENERATOR} v{VERSION})")
        return 0 if ok else 1
    os.makedirs(os.path.dirname(os.path.abspath(a.output_prefix)), exist_ok=True)
    if a.cmd == "pretrain":
        st = build_pretrain(a.output_prefix, a.seed, a.num_docs, a.vocab_size, a.min_len, a.max_len)
    else:
        st = build_sft(a.output_prefix, a.seed, a.num_docs, a.vocab_size, a.min_prompt, a.max_prompt)
    files = ", ".join(f"{n} {i['sha256'][:12]}" for n, i in st["files"].items())
    print(f"{GENERATOR} v{VERSION} {a.cmd}: {a.num_docs} documents, {st['tokens']} tokens -> "
          f"{a.output_prefix} ({files})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
