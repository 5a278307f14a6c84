"""The engine of ``tools/preprocess_data.py``: JSONL / JSON / parquet in, Megatron indexed datasets out.

Owns: the flags (ours and MindSpeed-LLM's: ``--tokenizer-name-or-path``, ``--tokenizer-type PretrainedFromHF``,
``--handler-name``, ``--map-keys``, ``--prompt-type deepseek2|deepseek3``, ``--log-interval``; see
docs/MIGRATING.md), reading input files record by record (JSONL; a file whose first character is ``[`` is
read as one JSON array, as alpaca_data.json is; ``.parquet`` files, HuggingFace datasets' format, row by row
with pyarrow), tokenizing in ``--workers`` processes, bad-line handling
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
from .. import arguments_compat as compat
from .chat_templates import encode_chat
from .errors import DataError
from .indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path, optimal_dtype
from .sft_format import INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX
from .tokenizer import TOKENIZER_TYPES, build_tokenizer

MAX_REPORTED_BAD_LINES = 50


INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_TYPE_CHOICES = TOKENIZER_TYPES + tuple(compat.TOKENIZER_TYPE_SPELLINGS)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokenize JSONL / JSON / parquet into Megatron indexed datasets "
                                            "(.bin/.idx).", allow_abbrev=False)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help="JSONL / JSON / parquet file(s), globs or directories (every *.jsonl / *.json / *.parquet "
                        "in them)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (pretraining); one output each")
    g.add_argument("--on-bad-line", choices=("fatal", "skip"), default="fatal",
                   help="malformed JSON / missing key / bad record: stop (default) or report and skip")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPE_CHOICES,
                   help="PretrainedFromHF (MindSpeed-LLM's name) is HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", "--tokenizer-name-or-path", dest="tokenizer_model", default=None,
                   help="SentencePiece .model, or HF tokenizer dir (--tokenizer-name-or-path: MindSpeed-LLM's name)")
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    g.add_argument("--append-eod", action="store_true", help="append the eod token to every document")
    g.add_argument("--prepend-bos", action="store_true", help="put the bos token first in every document")
    g = p.add_argument_group("sft")
    g.add_argument("--sft", action="store_true", help="instruction data: write input ids and the loss mask")
    g.add_argument("--prompt-type", default="auto",
                   help="chat template: 'auto' (the tokenizer's own, else deepseek), 'tokenizer', 'deepseek' "
                        "(= MindSpeed's deepseek3), 'deepseek2' (= deepseek2-lite)")
    g.add_argument("--sft-format", default="auto", choices=sft_format.SFT_FORMATS)
    g.add_argument("--handler-name", default=None, choices=tuple(compat.PREPROCESS_HANDLERS),
                   help="MindSpeed-LLM: GeneralPretrainHandler = pretraining documents; AlpacaStyleInstructionHandler"
                        " / SharegptStyleInstructionHandler = --sft --sft-format alpaca / sharegpt")
    g.add_argument("--map-keys", default=None,
                   help="MindSpeed-LLM: JSON renaming record keys, e.g. '{\"prompt\":\"instruction\",\"query\":"
                        "\"input\",\"response\":\"output\"}' (alpaca) or '{\"messages\":\"conversations\","
                        "\"tags\":{\"role_tag\":\"from\",...}}' (sharegpt)")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32", "int64"),
                   help="token dtype; auto = uint16 below 65500 tokens of vocab, else int32 (Megatron's rule)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--chunk-bytes", type=int, default=1 << 18, help="bytes of input per worker task")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    g.add_argument("--log-interval", type=int, default=None,
                   help="a progress line every N documents instead of the progress bar (MindSpeed-LLM)")
    compat.add_tool_flags(p, compat.PREPROCESS_FLAGS)
    return p


def normalize_args(args) -> List[str]:
    """MindSpeed-LLM's spellings -> ours (in place); returns the start-up lines (flags accepted without effect).
    Raises DataError for a refused flag or a contradiction."""
    from ..config import ConfigError
    try:
        lines = compat.resolve_tool(args, compat.PREPROCESS_FLAGS)
    except ConfigError as e:
        raise DataError(str(e))
    args.tokenizer_type = compat.TOKENIZER_TYPE_SPELLINGS.get(args.tokenizer_type, args.tokenizer_type)
    if args.handler_name is not None:
        fmt = compat.PREPROCESS_HANDLERS[args.handler_name]
        if fmt is None and args.sft:
            raise DataError(f"--handler-name {args.handler_name} writes pretraining documents but --sft is given; "
                            f"drop one")
        if fmt is not None:
            if args.sft_format not in ("auto", fmt):
                raise DataError(f"--handler-name {args.handler_name} reads {fmt} records but --sft-format is "
                                f"{args.sft_format}; drop one")
            args.sft, args.sft_format = True, fmt
    args.key_map = parse_map_keys(args.map_keys, args.sft_format if args.sft else None)
    if args.log_interval is not None:
        if args.log_interval < 1:
            raise DataError(f"--log-interval {args.log_interval} must be >= 1")
        args.no_progress = True
    return lines


_ALPACA_STD = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                  "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}


def parse_map_keys(text: Optional[str], fmt: Optional[str]) -> Optional[dict]:
    """MindSpeed-LLM's --map-keys (standard name -> the dataset's column) checked for the record form."""
    if text is None:
        return None
    if fmt is None:
        raise DataError("--map-keys renames instruction-record keys; give --handler-name "
                        "AlpacaStyleInstructionHandler / SharegptStyleInstructionHandler (or --sft)")
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"--map-keys {text!r} is not JSON ({e.msg}); e.g. '{{\"prompt\":\"instruction\"}}'")
    if not isinstance(m, dict):
        raise DataError(f"--map-keys {text!r} must be a JSON object")
    known = set(_ALPACA_STD) if fmt == "alpaca" else {"messages", "system", "tags"}
    bad = sorted(set(m) - known)
    if bad:
        raise DataError(f"--map-keys names {', '.join(bad)}, unknown for {fmt} records; use {', '.join(sorted(known))}")
    if fmt == "sharegpt" and "tags" in m:
        if not isinstance(m["tags"], dict) or set(m["tags"]) - set(_SHAREGPT_TAGS):
            raise DataError(f"--map-keys tags {m['tags']!r} must be an object with keys among "
                            f"{', '.join(_SHAREGPT_TAGS)}")
    return {"format": fmt, "map": m}


def apply_map_keys(rec, key_map: Optional[dict], where: str):
    """One record in the dataset's own keys -> the keys sft_format reads."""
    if key_map is None or not isinstance(rec, dict):
        return rec
    m = key_map["map"]
    if key_map["format"] == "alpaca":
        out = {k: v for k, v in rec.items() if k not in m.values()}
        for std, col in m.items():
            if col in rec:
                out[_ALPACA_STD[std]] = rec[col]
        return out
    tags = dict(_SHAREGPT_TAGS, **m.get("tags", {}))
    conv = rec.get(m.get("messages", "conversations"))
    if not isinstance(conv, list):
        raise DataError(f"{where}: {m.get('messages', 'conversations')!r} must be a list of turns (--map-keys)")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    msgs = []
    system = rec.get(m.get("system", "system"))
    if isinstance(system, str) and system:
        msgs.append({"role": "system", "content": system})
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or tags["role_tag"] not in t or tags["content_tag"] not in t:
            raise DataError(f"{where}: turn {i} is {t!r}; each turn needs {tags['role_tag']!r} and "
                            f"{tags['content_tag']!r} (--map-keys tags)")
        role = roles.get(t[tags["role_tag"]])
        if role is None:
            raise DataError(f"{where}: turn {i} has {tags['role_tag']}={t[tags['role_tag']]!r}; expected one of "
                            f"{', '.join(roles)} (--map-keys tags)")
        msgs.append({"role": role, "content": t[tags["content_tag"]]})
    return {"messages": msgs}


# -- input ------------------------------------------------------------------------------------
def expand_inputs(inputs: List[str]) -> List[str]:
    files: List[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(f for suf in INPUT_SUFFIXES for f in glob.glob(os.path.join(spec, "*" + suf)))
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec))
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            raise DataError(f"--input {spec!r} matches no file; pass JSONL / JSON / parquet files, a glob or a "
                            f"directory")
        files.extend(found)
    return files


def iter_parquet(path: str) -> Iterator[Tuple[int, str, int]]:
    """(row number, the row as a JSON line, bytes) of a parquet file, read in record batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading parquet needs pyarrow ({e}); pip install pyarrow")
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})")
    rows = max(1, f.metadata.num_rows)
    size = os.path.getsize(path)
    n = 0
    for batch in f.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            n += 1
            yield n, json.dumps(rec, ensure_ascii=False, default=str), size // rows


def iter_lines(path: str) -> Iterator[Tuple[int, str, int]]:
    """(line number, raw line, bytes) of a JSONL file; a JSON array file yields one entry per element; a
    ``.parquet`` file one entry per row."""
    if path.endswith(".parquet"):
        yield from iter_parquet(path)
        return
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
        key_map = getattr(self.args, "key_map", None)
        rec = apply_map_keys(rec, key_map, where)
        fmt = "messages" if key_map is not None and key_map["format"] == "sharegpt" else self.args.sft_format
        msgs = sft_format.record_to_messages(rec, fmt, where)
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
    created = _missing_dirs(os.path.dirname(os.path.abspath(args.output_prefix)))
    try:
        builders = {k: IndexedDatasetBuilder(data_file_path(p), dt) for k, (p, dt) in outputs.items()}
    except BaseException:
        _remove_empty(created)
        raise
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
                _log_progress(args, stats, t0)
            if bar is not None:
                bar.update(sum(c[3] for c in chunk))
                dt = max(time.time() - t0, 1e-9)
                bar.set_postfix(docs_per_s=f"{stats['documents'] / dt:.0f}", refresh=False)

        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if stats["documents"] == 0:
            raise DataError(f"{', '.join(files[:3])}: no document to write ({stats['empty']} empty, "
                            f"{stats['skipped']} skipped lines); nothing was written - check --input and --json-keys")
        for k, (p, _) in outputs.items():
            builders[k].finalize(index_file_path(p))
    except BaseException:
        for b in builders.values():
            b.abort()
        _remove_empty(created)  # the directories this run created for --output-prefix, if still empty
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    stats["seconds"] = time.time() - t0
    stats["outputs"] = [p for p, _ in outputs.values()]
    return stats


def _missing_dirs(path: str) -> List[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while path and not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _remove_empty(dirs: List[str]) -> None:
    for d in dirs:
        try:
            os.rmdir(d)  # only when empty
        except OSError:
            return


def _log_progress(args, stats, t0) -> None:
    """--log-interval N: one line every N documents (MindSpeed-LLM's progress output)."""
    every = getattr(args, "log_interval", None)
    if every and stats["documents"] and stats["documents"] % every == 0 and stats.get("logged") != stats["documents"]:
        stats["logged"] = stats["documents"]
        dt = max(time.time() - t0, 1e-9)
        print(f"processed {stats['documents']} documents ({stats['documents'] / dt:.1f} docs/s, "
              f"{stats['bytes'] / (1 << 20) / dt:.2f} MiB/s)", file=sys.stderr, flush=True)


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
        for line in normalize_args(args):
            print(line)
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
