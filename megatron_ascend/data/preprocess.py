"""The engine of ``tools/preprocess_data.py``: JSONL in, Megatron indexed datasets out.

Owns: the flags, reading input files line by line (JSONL; a file whose first character is ``[`` is read
as one JSON array, as alpaca_data.json is), tokenizing in ``--workers`` processes, bad-line handling
(``--on-bad-line fatal|skip``, each reported as ``file:line: why``), empty-document accounting, the
progress bar and the atomic outputs:

- pretraining: ``PREFIX_{key}_document.bin/.idx`` for each ``--json-keys`` key;
- ``--sft``: ``PREFIX_input_ids_document`` (int32 ids, or uint16 for small vocabularies) and
  ``PREFIX_loss_mask_document`` (uint8, 1 on assistant tokens), one sequence per conversation.

Does not own: the format (indexed_dataset.py), tokenizers, chat templates, record forms (sft_format.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import numpy as np

from . import sft_format
from .chat_templates import encode_chat
from .errors import DataError
from .indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path, optimal_dtype
from .sft_format import INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX
from .tokenizer import TOKENIZER_TYPES, build_tokenizer

MAX_REPORTED_BAD_LINES = 50


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokenize JSONL into Megatron indexed datasets (.bin/.idx).")
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help="JSONL file(s), globs or directories (every *.jsonl / *.json in them)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (pretraining); one output each")
    g.add_argument("--on-bad-line", choices=("fatal", "skip"), default="fatal",
                   help="malformed JSON / missing key / bad record: stop (default) or report and skip")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, or HF tokenizer dir")
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    g.add_argument("--append-eod", action="store_true", help="append the eod token to every document")
    g.add_argument("--prepend-bos", action="store_true", help="put the bos token first in every document")
    g = p.add_argument_group("sft")
    g.add_argument("--sft", action="store_true", help="instruction data: write input ids and the loss mask")
    g.add_argument("--prompt-type", default="auto",
                   help="chat template: 'auto' (the tokenizer's own, else deepseek), 'tokenizer', 'deepseek'")
    g.add_argument("--sft-format", default="auto", choices=sft_format.SFT_FORMATS)
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32", "int64"),
                   help="token dtype; auto = uint16 below 65500 tokens of vocab, else int32 (Megatron's rule)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-bytes", type=int, default=1 << 18, help="bytes of input per worker task")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    return p


# -- input ------------------------------------------------------------------------------------
def expand_inputs(inputs: List[str]) -> List[str]:
    files: List[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.jsonl")) + glob.glob(os.path.join(spec, "*.json")))
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec))
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            raise DataError(f"--input {spec!r} matches no file; pass JSONL files, a glob or a directory")
        files.extend(found)
    return files


def iter_lines(path: str) -> Iterator[Tuple[int, str, int]]:
    """(line number, raw line, bytes) of a JSONL file; a JSON array file yields one entry per element."""
    with open(path, "rb") as fb:
        head = fb.read(4096).lstrip()
    if head.startswith(b"["):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: the JSON array is not valid JSON ({e.msg})")
        size = os.path.getsize(path)
        for i, rec in enumerate(items, 1):
            yield i, json.dumps(rec, ensure_ascii=False), size // max(1, len(items))
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw.decode("utf-8", errors="replace"), len(raw)


def iter_chunks(files: List[str], chunk_bytes: int):
    for path in files:
        chunk, size = [], 0
        for lineno, line, nbytes in iter_lines(path):
            chunk.append((lineno, line, nbytes))
            size += nbytes
            if size >= chunk_bytes:
                yield path, chunk
                chunk, size = [], 0
        if chunk:
            yield path, chunk


# -- encoding (runs in workers) ---------------------------------------------------------------
class Encoder:
    """Turns one chunk of lines into results; built once per worker process."""

    def __init__(self, args):
        self.args = args
        self.tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size)
        self.template = self.tok.chat_template_for(args.prompt_type) if args.sft else None

    def encode_chunk(self, job):
        path, chunk = job
        out = []
        for lineno, line, nbytes in chunk:
            where = f"{path}:{lineno}"
            if not line.strip():
                out.append((where, "blank", None, nbytes))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                out.append((where, "bad", f"{where}: not valid JSON ({e.msg} at column {e.colno})", nbytes))
                continue
            try:
                out.append((where, "ok", self.encode_sft(rec, where) if self.args.sft else self.encode_text(rec, where),
                             nbytes))
            except DataError as e:
                msg = str(e)
                out.append((where, "bad", msg if msg.startswith(where) else f"{where}: {msg}", nbytes))
        return out

    def encode_text(self, rec, where):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a JSON object was expected, got {type(rec).__name__}")
        docs = {}
        for key in self.args.json_keys:
            if key not in rec:
                raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(sorted(rec)[:8])}); check --json-keys")
            text = rec[key]
            if not isinstance(text, str):
                raise DataError(f"{where}: {key!r} is {type(text).__name__}, not a string")
            if not text.strip():
                docs[key] = None  # empty document: counted and skipped by the writer
                continue
            ids = self.tok.tokenize(text)
            if self.args.prepend_bos and self.tok.bos is not None:
                ids = [self.tok.bos] + ids
            if self.args.append_eod:
                ids.append(self.tok.eod)
            docs[key] = np.asarray(ids, dtype=np.int64)
        return docs

    def encode_sft(self, rec, where):
        msgs = sft_format.record_to_messages(rec, self.args.sft_format, where)
        ids, mask = encode_chat(self.tok.tokenize, self.template, msgs, self.tok.bos, self.tok.eod, where=where)
        if self.args.append_eod and (not ids or ids[-1] != self.tok.eod):
            ids.append(self.tok.eod)
            mask.append(1)
        return {"ids": np.asarray(ids, dtype=np.int64), "mask": np.asarray(mask, dtype=np.uint8)}


_ENCODER: Optional[Encoder] = None


def _init_worker(args):
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = Encoder(args)


def _encode(job):
    return _ENCODER.encode_chunk(job)


# -- driver -------------------------------------------------------------------------------------
def run(args) -> dict:
    """Preprocess; returns a summary dict (documents, tokens, bytes, seconds, skipped, empty, outputs)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers} must be >= 1")
    files = expand_inputs(args.input)
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size)
    if args.sft:
        tok.chat_template_for(args.prompt_type)  # fail early on an unknown template
    dtype = optimal_dtype(tok.vocab_size) if args.dtype == "auto" else np.dtype(args.dtype).type
    if np.iinfo(dtype).max < tok.vocab_size - 1:
        raise DataError(f"--dtype {args.dtype} cannot hold ids of a {tok.vocab_size}-token vocabulary; use int32")
    if args.sft:
        outputs = {"ids": (args.output_prefix + INPUT_IDS_SUFFIX, dtype),
                   "mask": (args.output_prefix + LOSS_MASK_SUFFIX, np.uint8)}
    else:
        outputs = {k: (f"{args.output_prefix}_{k}_document", dtype) for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(data_file_path(p), dt) for k, (p, dt) in outputs.items()}
    total_bytes = sum(os.path.getsize(f) for f in files)
    stats = {"documents": 0, "tokens": 0, "bytes": 0, "skipped": 0, "empty": 0, "first_empty": None,
             "bad_lines": []}
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                   file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    t0 = time.time()
    pool = None
    try:
        jobs = iter_chunks(files, args.chunk_bytes)
        if args.workers == 1:
            _init_worker(args)
            results = map(_encode, jobs)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
            results = pool.imap(_encode, jobs, chunksize=1)
        for chunk in results:
            for where, status, payload, nbytes in chunk:
                stats["bytes"] += nbytes
                if status == "blank":
                    continue
                if status == "bad":
                    if args.on_bad_line == "fatal":
                        raise DataError(f"{payload} (pass --on-bad-line skip to skip such lines)")
                    stats["skipped"] += 1
                    if len(stats["bad_lines"]) < MAX_REPORTED_BAD_LINES:
                        stats["bad_lines"].append(payload)
                        print(f"warning: skipped {payload}", file=sys.stderr)
                    elif stats["skipped"] == MAX_REPORTED_BAD_LINES + 1:
                        print(f"warning: more bad lines; only the first {MAX_REPORTED_BAD_LINES} are listed",
                              file=sys.stderr)
                    continue
                _write(builders, payload, where, stats)
            if bar is not None:
                bar.update(sum(c[3] for c in chunk))
                dt = max(time.time() - t0, 1e-9)
                bar.set_postfix(docs_per_s=f"{stats['documents'] / dt:.0f}", refresh=False)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for k, (p, _) in outputs.items():
            builders[k].finalize(index_file_path(p))
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    stats["seconds"] = time.time() - t0
    stats["outputs"] = [p for p, _ in outputs.values()]
    return stats


def _write(builders, payload, where, stats) -> None:
    if "mask" in payload and "ids" in payload:
        builders["ids"].add_document(payload["ids"])
        builders["mask"].add_document(payload["mask"])
        stats["documents"] += 1
        stats["tokens"] += len(payload["ids"])
        return
    if any(v is None for v in payload.values()):
        stats["empty"] += 1
        stats["first_empty"] = stats["first_empty"] or where
        return  # skip the whole record so the key datasets stay aligned document by document
    for k, ids in payload.items():
        builders[k].add_document(ids)
        stats["tokens"] += len(ids)
    stats["documents"] += 1


def summary_line(stats: dict) -> str:
    dt = max(stats["seconds"], 1e-9)
    mb = stats["bytes"] / (1 << 20)
    s = (f"wrote {', '.join(o + '.{bin,idx}' for o in stats['outputs'])}: {stats['documents']} documents, "
         f"{stats['tokens']} tokens from {mb:.1f} MiB in {dt:.1f} s ({stats['documents'] / dt:.0f} docs/s, "
         f"{mb / dt:.2f} MiB/s)")
    if stats["empty"]:
        s += f"; skipped {stats['empty']} empty documents (first at {stats['first_empty']})"
    if stats["skipped"]:
        s += f"; skipped {stats['skipped']} bad lines"
    return s


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        stats = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unreadable input, unwritable output dir, disk full
        print(f"error: {e.strerror or e} ({e.filename or ''}); check the --input / --output-prefix paths",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written (temporary files removed)", file=sys.stderr)
        return 130
    print(summary_line(stats))
    return 0
