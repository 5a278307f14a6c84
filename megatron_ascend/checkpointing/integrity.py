"""Checkpoint integrity: per-file sizes and SHA-256 checksums, recorded at save and verified at load.

Owns:

* ``HashingFileSystemWriter``: DCP's ``FileSystemWriter`` whose output streams hash the bytes as DCP writes
  them, so a save costs no second read of its data (``records()``: {file name: {"bytes", "sha256"}} of the
  files this process wrote). A stream that is seeked falls back to hashing the file after it is closed.
* ``file_record(path)``: the same record computed from a file on disk (the small ``.metadata`` and files
  written by other processes, e.g. the HF converter's workers).
* ``seal_common(common)`` / ``check_common(text, where)``: ``common.json`` carries the checksum of its own
  canonical JSON (``common_sha256``), so a damaged common.json that still parses is caught too.
* ``verify_files(path, files, mode, process_group)``: every recorded file exists with its size (rank 0 of the
  group), and with ``mode == "checksum"`` its SHA-256 matches; the hashing is spread over the group's ranks by
  bytes, so each rank reads about 1/world of the checkpoint. Returns the same error (naming the first bad
  file) on every rank, or None.

What this protects against: torn, truncated or bit-flipped files (a disk, a network file system, a copy that
stopped). What it does not: a deliberately altered checkpoint (whoever can write the files can rewrite the
records too); that is why nothing read from a checkpoint can run code (safe_metadata.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from .errors import CheckpointError

HASH = "sha256"
_BLOCK = 8 << 20


def file_record(path: str) -> Dict[str, object]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(_BLOCK)
            if not b:
                break
            h.update(b)
            n += len(b)
    return {"bytes": n, HASH: h.hexdigest()}


class _HashingStream(io.RawIOBase):
    """Write-through wrapper of a binary file that hashes every byte written (in order)."""

    def __init__(self, raw, on_close):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._n = 0
        self._sequential = True
        self._on_close = on_close
        self._done = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def write(self, b) -> int:
        if self._sequential and self._raw.tell() != self._n:
            self._sequential = False
        n = self._raw.write(b)
        if self._sequential:
            mv = memoryview(b).cast("B")
            self._hash.update(mv[:n] if n is not None else mv)
            self._n += n if n is not None else len(mv)
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        self._sequential = False
        return self._raw.seek(offset, whence)

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        if not self._done:
            self._raw.flush()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._raw.flush()
            record = {"bytes": self._n, HASH: self._hash.hexdigest()} if self._sequential else None
            self._raw.close()
            self._on_close(record)
        super().close()


class _HashingFileSystem(FileSystem):
    def __init__(self, records: Dict[str, Dict[str, object]]):
        super().__init__()
        self._records = records

    @contextmanager
    def create_stream(self, path, mode: str):
        name = os.path.basename(str(path))
        if mode != "wb" or not name.endswith(".distcp"):
            with super().create_stream(path, mode) as s:
                yield s
            return
        raw = open(path, "wb")

        def done(record, path=str(path), name=name):
            if record is None or record["bytes"] != os.path.getsize(path):
                record = file_record(path)  # seeked or short-written: hash what is on disk
            self._records[name] = record

        stream = _HashingStream(raw, done)
        try:
            yield stream
        finally:
            stream.close()


class HashingFileSystemWriter(dcp.FileSystemWriter):
    """``dcp.FileSystemWriter`` recording size and SHA-256 of each data file as it writes it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._file_records: Dict[str, Dict[str, object]] = {}
        self.fs = _HashingFileSystem(self._file_records)

    def records(self) -> Dict[str, Dict[str, object]]:
        return dict(self._file_records)


# ---------------------------------------------------------------------------------------------- common.json
def _canonical(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def seal_common(common: Dict) -> Dict:
    """``common`` plus ``common_sha256``, the checksum of its canonical JSON without that field."""
    body = {k: v for k, v in common.items() if k != "common_sha256"}
    return dict(body, common_sha256=hashlib.sha256(_canonical(body).encode()).hexdigest())


def check_common(text: str, where: str) -> Dict:
    """Parse common.json; a file that does not parse or whose recorded checksum differs is a CheckpointError."""
    try:
        common = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where} is not valid JSON ({e}); the checkpoint is truncated or corrupt") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{where} holds {type(common).__name__}, not a JSON object; the checkpoint is corrupt")
    want = common.get("common_sha256")
    if want is not None:
        body = {k: v for k, v in common.items() if k != "common_sha256"}
        if hashlib.sha256(_canonical(body).encode()).hexdigest() != want:
            raise CheckpointError(f"{where} does not match its recorded checksum; the file is corrupt")
    return common


# ---------------------------------------------------------------------------------------------- verification
def _assign(files: Dict[str, Dict[str, object]], world: int) -> List[List[str]]:
    """Files per rank, largest first onto the least loaded rank (deterministic: every rank computes it)."""
    loads = [0] * world
    out: List[List[str]] = [[] for _ in range(world)]
    for name in sorted(files, key=lambda n: (-int(files[n].get("bytes", 0)), n)):
        r = loads.index(min(loads))
        out[r].append(name)
        loads[r] += int(files[name].get("bytes", 0))
    return out


def _check_sizes(path: str, files: Dict[str, Dict[str, object]]) -> Optional[str]:
    for name in sorted(files):
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            return f"{fp} is missing"
        size = os.path.getsize(fp)
        if size != int(files[name]["bytes"]):
            return f"{fp} has {size} bytes, the checkpoint recorded {files[name]['bytes']} (truncated or torn)"
    data = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    extra = [n for n in data if n not in files]
    if extra:
        return f"{os.path.join(path, extra[0])} is not among the files the checkpoint recorded"
    return None


def _check_hashes(path: str, files: Dict[str, Dict[str, object]], names: List[str]) -> Optional[str]:
    for name in names:
        fp = os.path.join(path, name)
        try:
            got = file_record(fp)
        except OSError as e:
            return f"{fp} cannot be read ({e})"
        if got[HASH] != files[name].get(HASH):
            return f"{fp} does not match its recorded SHA-256 (corrupt: a changed byte)"
    return None


def verify_files(path: str, files: Optional[Dict[str, Dict[str, object]]], mode: str = "checksum",
                 process_group=None, collective: bool = True) -> Optional[str]:
    """None when every recorded file of checkpoint ``path`` is intact, else one message naming the first bad file
    (the same on every rank of ``process_group`` when ``collective``). mode: "checksum" | "size"."""
    if mode not in ("checksum", "size"):
        raise ValueError(f"verify mode {mode!r}: use checksum or size")
    distributed = collective and dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(process_group) if distributed else 1
    rank = dist.get_rank(process_group) if distributed else 0
    err = None
    if files is not None:
        if rank == 0:
            err = _check_sizes(path, files)
        if distributed:
            box = [err]
            dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                                       group=process_group)
            err = box[0]
        if err is None and mode == "checksum":
            err = _check_hashes(path, files, _assign(files, world)[rank])
            if distributed:
                errs: List[Optional[str]] = [None] * world
                dist.all_gather_object(errs, err, group=process_group)
                err = next((e for e in errs if e), None)
    return err
