"""The Megatron indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``): reader and builder.

Owns: the byte layout, its validation, the memory-mapped reader :class:`IndexedDataset`, the atomic
writer :class:`IndexedDatasetBuilder`, and :func:`check_token_ids`. Does not own: tokenization
(tokenizer.py) or what the sequences mean (gpt_dataset.py, sft_dataset.py).

``.bin`` is every sequence's tokens back to back in one dtype. ``.idx`` is little-endian::

    b"MMIDIDX\\x00\\x00"          magic, 9 bytes
    <Q  version = 1
    <B  dtype code                1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    <Q  sequence_count  S
    <Q  document_count  D         = number of documents + 1
    int32[S]  sequence_lengths    tokens per sequence
    int64[S]  sequence_pointers   byte offset of each sequence in .bin (exclusive cumsum of lengths x itemsize)
    int64[D]  document_indices    0, then the sequence count at the end of each document
    int8[S]   sequence_modes      only in multimodal files

This is byte-for-byte the format of Megatron-LM's ``megatron/core/datasets/indexed_dataset.py``, so
files written by either tool are read by the other. Without ``--split-sentences`` one sequence is one
document.
"""
from __future__ import annotations

import os
import struct
from array import array
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8

DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's choice: uint16 when the vocab is below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        raise DataError(f"dtype {dt} cannot be stored in an indexed dataset; use one of "
                        f"{', '.join(str(np.dtype(v)) for v in DTYPE_CODES.values())}")
    return CODE_OF_DTYPE[dt]


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _strip_ext(path_prefix: str) -> str:
    for ext in (".bin", ".idx"):
        if path_prefix.endswith(ext):
            return path_prefix[: -len(ext)]
    return path_prefix


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is sequence i as a read-only numpy array (a view on the mmap).

    Every structural fact in the .idx is checked on open (magic, version, dtype code, file length,
    document index, pointers against lengths x itemsize, .bin length), and a failure raises
    :class:`DataError` naming the file and what to do.
    """

    def __init__(self, path_prefix: str, multimodal: bool = False):
        prefix = _strip_ext(path_prefix)
        self.path_prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"indexed dataset file {p!r} does not exist; --data-path takes the prefix without "
                                f".bin/.idx (e.g. out/corpus_text_document) written by tools/preprocess_data.py")
        self._read_index(idx_path, multimodal)
        self._open_bin(bin_path)

    # -- index ------------------------------------------------------------------------------
    def _read_index(self, idx_path: str, multimodal: bool) -> None:
        size = os.path.getsize(idx_path)
        fix = "re-run tools/preprocess_data.py to rebuild it"
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise DataError(f"{idx_path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header; the file is "
                            f"truncated; {fix}")
        if head[:9] != INDEX_MAGIC:
            raise DataError(f"{idx_path}: starts with {head[:9]!r}, not the MMIDIDX magic {INDEX_MAGIC!r}; it is not "
                            f"a Megatron mmap indexed dataset (or it is corrupted); {fix}")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != INDEX_VERSION:
            raise DataError(f"{idx_path}: index version {version} is not supported (only {INDEX_VERSION}); {fix}")
        code = head[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: dtype code {code} is unknown (valid codes {sorted(DTYPE_CODES)}); the "
                            f"header is corrupted; {fix}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        seq_count, doc_count = struct.unpack("<QQ", head[18:34])
        need = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
        if size < need:
            raise DataError(f"{idx_path}: {size} bytes, but its header ({seq_count} sequences, {doc_count} document "
                            f"entries) needs {need}; the file is truncated; {fix}")
        has_modes = size == need + seq_count and seq_count > 0
        if multimodal and not has_modes:
            raise DataError(f"{idx_path}: multimodal=True but the file has no sequence modes")
        if size not in (need, need + seq_count):
            raise DataError(f"{idx_path}: {size} bytes, but its header ({seq_count} sequences, {doc_count} document "
                            f"entries) needs {need}; the file is corrupted; {fix}")
        self._index_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8) if size else None
        buf = self._index_mmap
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=seq_count, offset=off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=seq_count, offset=off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=doc_count, offset=off)
        off += 8 * doc_count
        self.sequence_modes = (np.frombuffer(buf, dtype=np.int8, count=seq_count, offset=off)
                               if has_modes else None)
        self._idx_path = idx_path
        self._validate_index(fix)

    def _validate_index(self, fix: str) -> None:
        p, lengths, docs = self._idx_path, self.sequence_lengths, self.document_indices
        n = len(lengths)
        if len(docs) == 0 or docs[0] != 0:
            raise DataError(f"{p}: document_indices must start with 0 (got {docs[:1].tolist()}); {fix}")
        if docs[-1] != n:
            raise DataError(f"{p}: document_indices end at {int(docs[-1])}, but there are {n} sequences; {fix}")
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise DataError(f"{p}: document_indices are not non-decreasing; the file is corrupted; {fix}")
        if n and lengths.min() < 0:
            bad = int(np.argmin(lengths))
            raise DataError(f"{p}: sequence {bad} has negative length {int(lengths[bad])}; the file is corrupted; "
                            f"{fix}")
        if n:
            expect = np.zeros(n, dtype=np.int64)
            np.cumsum(lengths[:-1], out=expect[1:])
            item = self.dtype.itemsize
            if not np.array_equal(self.sequence_pointers, expect * item):
                for other in (1, 2, 4, 8):
                    if other != item and np.array_equal(self.sequence_pointers, expect * other):
                        raise DataError(f"{p}: the pointers imply {other}-byte tokens but the header's dtype is "
                                        f"{self.dtype} ({item} bytes); the header has the wrong dtype code; {fix}")
                bad = int(np.nonzero(self.sequence_pointers != expect * item)[0][0])
                raise DataError(f"{p}: sequence {bad} points at byte {int(self.sequence_pointers[bad])}, but the "
                                f"lengths before it put it at {int(expect[bad] * item)}; the file is corrupted; {fix}")
            self._num_tokens = int(expect[-1]) + int(lengths[-1])
        else:
            self._num_tokens = 0

    # -- data -------------------------------------------------------------------------------
    def _open_bin(self, bin_path: str) -> None:
        size = os.path.getsize(bin_path)
        need = self._num_tokens * self.dtype.itemsize
        if size < need:
            raise DataError(f"{bin_path}: {size} bytes, but its .idx describes {self._num_tokens} tokens of "
                            f"{self.dtype} = {need} bytes; the .bin is truncated (or the .idx belongs to another "
                            f".bin); re-run tools/preprocess_data.py")
        if size != need:
            raise DataError(f"{bin_path}: {size} bytes, but its .idx describes exactly {need} bytes "
                            f"({self._num_tokens} tokens of {self.dtype}); the .bin and .idx do not belong together; "
                            f"re-run tools/preprocess_data.py")
        self._bin_path = bin_path
        if need:
            self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype, shape=(self._num_tokens,))
        else:
            self._bin = np.zeros(0, dtype=self.dtype)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the .bin as one flat read-only array (an mmap view)."""
        return self._bin

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, idx: Union[int, slice]):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix}")
        s = self._start(i)
        return self._bin[s: s + int(self.sequence_lengths[i])]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {n}")
        s = self._start(idx) + offset
        return self._bin[s: s + length]

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated)."""
        a, b = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if b == a:
            return np.zeros(0, dtype=self.dtype)
        s = self._start(a)
        e = self._start(b - 1) + int(self.sequence_lengths[b - 1])
        return self._bin[s:e]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


def check_token_ids(ds: IndexedDataset, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise DataError if any token id is negative or >= vocab_size (names the first bad sequence)."""
    flat = ds.tokens
    for s in range(0, len(flat), chunk):
        block = flat[s: s + chunk]
        hi, lo = block.max(), block.min()
        if hi >= vocab_size or lo < 0:
            pos = s + int(np.argmax((block >= vocab_size) | (block < 0)))
            seq = int(np.searchsorted(ds.sequence_pointers // ds.dtype.itemsize, pos, side="right")) - 1
            bad = flat[pos].item()
            raise DataError(f"{ds.path_prefix}: token id {bad} in sequence {seq} is outside the vocabulary "
                            f"[0, {vocab_size}); the data was tokenized with another tokenizer; re-run "
                            f"tools/preprocess_data.py with the training tokenizer")


class IndexedDatasetBuilder:
    """Writes ``.bin`` then ``.idx`` atomically: both go to ``*.tmp-<pid>`` names and are moved into place by
    ``finalize`` (old .idx removed first, then .bin, then .idx), so an interrupted run never leaves a pair
    that looks complete.

        b = IndexedDatasetBuilder("p_text_document.bin", dtype=np.uint16)
        b.add_document(tokens, [len(tokens)])
        b.finalize("p_text_document.idx")
    """

    def __init__(self, bin_path: str, dtype=np.int32, multimodal: bool = False):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject unsupported dtypes early
        self.bin_path = bin_path
        self._tmp_bin = f"{bin_path}.tmp-{os.getpid()}"
        d = os.path.dirname(os.path.abspath(bin_path))
        os.makedirs(d, exist_ok=True)
        self._file = open(self._tmp_bin, "wb")
        self.multimodal = multimodal
        self.sequence_lengths = array("i")  # compact: 4 / 8 bytes per entry, not a Python int each
        self.document_indices = array("q", [0])
        self.sequence_modes = array("b")
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def _as_array(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self._range is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._range[0] or hi > self._range[1]:
                raise DataError(f"{self.bin_path}: token ids span [{lo}, {hi}] which does not fit {self.dtype} "
                                f"[{self._range[0]}, {self._range[1]}]; build with a wider dtype "
                                f"(int32 for vocabularies of 65500 or more)")
        return arr.astype(self.dtype, copy=False)

    def add_item(self, tokens, mode: int = 0) -> None:
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))
        if self.multimodal:
            self.sequence_modes.append(int(mode))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None, modes=None) -> None:
        """Add one document: ``tokens`` cut into sequences of ``lengths`` (one sequence when None)."""
        arr = self._as_array(tokens)
        if lengths is None:
            lengths = [arr.size]
        if sum(lengths) != arr.size:
            raise DataError(f"add_document: lengths {list(lengths)} sum to {sum(lengths)}, not {arr.size} tokens")
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(int(x) for x in lengths)
        if self.multimodal:
            self.sequence_modes.extend(modes if modes is not None else [0] * len(lengths))
        self.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing dataset (the merge step of multi-partition preprocessing)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"cannot merge {path_prefix} ({other.dtype}) into a {self.dtype} dataset")
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.astype(np.int32))
        self.document_indices.extend((other.document_indices[1:] + base).astype(np.int64))
        if self.multimodal:
            modes = other.sequence_modes if other.sequence_modes is not None else np.zeros(len(other), np.int8)
            self.sequence_modes.extend(modes.astype(np.int8))
        with open(data_file_path(other.path_prefix), "rb") as f:
            while True:
                block = f.read(1 << 24)
                if not block:
                    break
                self._file.write(block)

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        tmp_idx = f"{idx_path}.tmp-{os.getpid()}"
        write_index(tmp_idx, self.dtype, self.sequence_lengths, self.document_indices,
                    self.sequence_modes if self.multimodal else None)
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, idx_path)

    def abort(self) -> None:
        """Drop the temporary file (call on failure)."""
        try:
            self._file.close()
        finally:
            if os.path.exists(self._tmp_bin):
                os.remove(self._tmp_bin)


def write_index(path: str, dtype, sequence_lengths: Iterable[int], document_indices: Iterable[int],
                sequence_modes: Optional[Iterable[int]] = None) -> None:
    lengths = np.asarray(sequence_lengths, dtype="<i4")
    docs = np.asarray(document_indices, dtype="<i8")
    item = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype="<i8")
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64), out=pointers[1:])
    pointers *= item
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes(order="C"))
