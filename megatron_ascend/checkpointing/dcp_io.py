"""torch.distributed.checkpoint (DCP) I/O of tensors in *global* coordinates.

Owns: ``Chunk`` (one rectangular piece of a global tensor: name, global shape, offsets, data), the save and
load planners that hand DCP those pieces, ``write_chunks`` / ``read_chunks``, the checkpoint metadata
lookup, and ``flat_range_boxes`` (a contiguous range of a row-major tensor as rectangular boxes, used for
the distributed optimizer's flat shards).

Why our own planners (DCP's lower-level planner API) rather than ShardedTensor or DTensor:

* ``ShardedTensor.init_from_local_shards`` is a collective over a process group *per tensor*; with pipeline
  parallelism each stage owns different tensors, so every rank would have to take part in the creation of
  tensors it does not hold (or we would need one group per tensor).
* DTensor needs a DeviceMesh whose dims match the split dims; our splits mix groups per tensor (tp on dim 0
  or 1, ep x etp on experts, pp placing whole tensors) and the distributed optimizer's flat shards are not a
  DTensor placement at all.
* The planner API only needs, per rank, a list of (offsets, sizes) boxes in the global tensor. DCP then
  merges the boxes of all ranks into the metadata, deduplicates identical boxes (replicas: only one rank
  writes each; ``dedup_save_plans`` balances the writers), and on load computes the overlap of any
  requested box with the stored boxes, which is exactly "load at another layout". It runs on gloo with no
  extra collectives beyond DCP's own plan gather.

Only tensors go through DCP here (no BYTE_IO items, because DCP unpickles those on load; the load planner
refuses them); all non-tensor state lives in a JSON file next to the DCP files (see checkpoint.py). DCP's
pickled ``.metadata`` is read through safe_metadata.py's restricted unpickler, by us and by ``dcp.load``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .errors import CheckpointError
from .integrity import HashingFileSystemWriter
from .safe_metadata import SafeFileSystemReader, load_metadata


@dataclass
class Chunk:
    """One box of a global tensor. ``tensor`` holds the data (save) or receives it in place (load).

    For streaming saves ``tensor`` may be None and ``loader`` a callable returning the data when DCP writes
    it; ``shape`` / ``dtype`` then describe it."""

    fqn: str
    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    tensor: Optional[torch.Tensor] = None
    loader: Optional[Callable[[], torch.Tensor]] = None
    shape: Optional[Tuple[int, ...]] = None
    dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        self.global_shape = tuple(int(x) for x in self.global_shape)
        self.offsets = tuple(int(x) for x in self.offsets)
        if self.tensor is not None:
            self.shape = tuple(self.tensor.shape)
            self.dtype = self.tensor.dtype
        if self.shape is None or self.dtype is None:
            raise ValueError(f"Chunk {self.fqn}: give a tensor, or shape and dtype with a loader")
        if len(self.offsets) != len(self.global_shape) or len(self.shape) != len(self.global_shape):
            raise ValueError(f"Chunk {self.fqn}: offsets {self.offsets} / shape {self.shape} do not match the "
                             f"rank of global shape {self.global_shape}")
        for o, n, g in zip(self.offsets, self.shape, self.global_shape):
            if o < 0 or o + n > g:
                raise ValueError(f"Chunk {self.fqn}: box offsets {self.offsets} sizes {self.shape} fall outside "
                                 f"the global shape {self.global_shape}")

    def data(self) -> torch.Tensor:
        t = self.tensor if self.tensor is not None else self.loader()
        if tuple(t.shape) != self.shape:
            raise CheckpointError(f"tensor {self.fqn} has shape {tuple(t.shape)}, expected {self.shape}")
        return t.detach()


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """The elements [start, end) of a row-major tensor of ``shape`` as boxes (offsets, sizes), in flat order.

    At most 2*ndim-1 boxes: a partial leading row, full middle rows, a partial trailing row (recursively)."""
    shape = tuple(int(s) for s in shape)
    if start >= end:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    r0, c0 = divmod(start, inner)
    r1, c1 = divmod(end, inner)
    zeros = (0,) * (len(shape) - 1)
    if r0 == r1:
        return [((r0,) + o, (1,) + s) for o, s in flat_range_boxes(shape[1:], c0, c1)]
    out = []
    if c0:
        out += [((r0,) + o, (1,) + s) for o, s in flat_range_boxes(shape[1:], c0, inner)]
        r0 += 1
    if r1 > r0:
        out.append(((r0,) + zeros, (r1 - r0,) + shape[1:]))
    if c1:
        out += [((r1,) + o, (1,) + s) for o, s in flat_range_boxes(shape[1:], 0, c1)]
    return out


def flat_shard_chunks(fqn: str, global_shape, base_offsets, local_shape, start: int, end: int,
                      flat: torch.Tensor) -> List[Chunk]:
    """Chunks for a 1-D tensor ``flat`` holding elements [start, end) of a local tensor of ``local_shape``
    whose box in the global tensor starts at ``base_offsets``."""
    if flat.numel() != end - start:
        raise CheckpointError(f"{fqn}: flat shard has {flat.numel()} elements but covers range [{start}, {end})")
    out, pos = [], 0
    for off, size in flat_range_boxes(local_shape, start, end):
        n = math.prod(size)
        view = flat[pos:pos + n].view(size)
        out.append(Chunk(fqn, global_shape, tuple(b + o for b, o in zip(base_offsets, off)), view))
        pos += n
    return out


def _size(x) -> torch.Size:
    return torch.Size(tuple(x))


class ChunkSavePlanner(DefaultSavePlanner):
    """Write items from a list of Chunks; DCP's global planning (merge + dedup of replicas) is kept."""

    def __init__(self, chunks: Iterable[Chunk], release_lazy: bool = False):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._release_lazy = release_lazy
        self._last_lazy: Optional[torch.Tensor] = None
        self._by_index: Dict[Tuple[str, Tuple[int, ...]], Chunk] = {}
        for c in chunks:  # a tensor held twice on one rank (tied weights) is written once
            self._by_index.setdefault((c.fqn, c.offsets), c)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for (fqn, off), c in self._by_index.items():
            items.append(WriteItem(
                index=MetadataIndex(fqn, _size(off)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=_size(off), sizes=_size(c.shape)),
                                            properties=TensorProperties(dtype=c.dtype), size=_size(c.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        c = self._by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.data()
        t = t if t.device.type == "cpu" else t.cpu()
        if self._release_lazy and c.tensor is None:
            # Streaming: DCP's FileSystemWriter keeps a reference to every tensor it wrote to a file until the
            # file is closed. With the serial loader (per_thread_copy_ahead=0) the previous lazy tensor has been
            # written when the next one is resolved, so its storage is freed here: memory stays at one tensor.
            if self._last_lazy is not None:
                self._last_lazy.untyped_storage().resize_(0)
            st = t.untyped_storage()
            if st.nbytes() != t.nbytes or not t.is_contiguous() or not st.resizable():
                t = t.contiguous().clone()  # own exactly its storage (safetensors' tensors are not resizable)
            self._last_lazy = t
        return t


class ChunkLoadPlanner(DefaultLoadPlanner):
    """Read items that fill each Chunk (in place) from whatever boxes the checkpoint stored."""

    def __init__(self, chunks: Iterable[Chunk]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._by_fqn: Dict[str, List[Chunk]] = {}
        for c in chunks:
            self._by_fqn.setdefault(c.fqn, []).append(c)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:  # the chunks were checked by read_chunks, agreed on every rank
        requests = []
        for fqn, chunks in self._by_fqn.items():
            md = self.metadata.state_dict_metadata[fqn]
            boxes = [ChunkStorageMetadata(offsets=_size(c.offsets), sizes=_size(c.shape)) for c in chunks]
            requests += create_read_items_for_chunk_list(fqn, md, boxes)
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._by_fqn[index.fqn][index.index].tensor

    def load_bytes(self, read_item, value) -> None:  # DCP would torch.load(weights_only=False) these
        raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn} is a pickled object; this package stores "
                              f"tensors only and never unpickles objects from a checkpoint")


def check_chunks_against_metadata(metadata: Metadata, chunks: Sequence[Chunk], where: str = "") -> None:
    """One CheckpointError listing the tensors the checkpoint lacks or holds with another global shape."""
    missing, wrong = [], []
    stored = metadata.state_dict_metadata
    for c in chunks:
        md = stored.get(c.fqn)
        if not isinstance(md, TensorStorageMetadata):
            missing.append(c.fqn)
        elif tuple(md.size) != c.global_shape:
            wrong.append(f"{c.fqn} (checkpoint {tuple(md.size)}, model {c.global_shape})")
    missing = sorted(set(missing))
    wrong = sorted(set(wrong))
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:4])}")
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) with another global shape, e.g. {', '.join(wrong[:3])}")
        raise CheckpointError(f"checkpoint {where or ''} does not match the model: " + "; ".join(parts) +
                              ". Check that --load points at a checkpoint of this model config (or use "
                              "--no-load-optim / --finetune if only optimizer state is missing)")


def write_chunks(path: str, chunks: Sequence[Chunk], process_group=None, streaming: bool = False
                 ) -> Dict[str, Dict[str, object]]:
    """Collective over ``process_group`` (all ranks when None; no group needed without torch.distributed).
    Returns {file name: {"bytes", "sha256"}} of the data files this process wrote, hashed as they were written.

    streaming: chunks with a ``loader`` are produced one at a time and freed once written (converters)."""
    writer = HashingFileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                                     overwrite=True, per_thread_copy_ahead=0 if streaming else 10_000_000)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({}, storage_writer=writer, planner=ChunkSavePlanner(chunks, release_lazy=streaming),
                 process_group=process_group, no_dist=not is_distributed())
    return writer.records()


def read_chunks(path: str, chunks: Sequence[Chunk], process_group=None, metadata: Optional[Metadata] = None) -> None:
    """Fill every chunk's tensor in place from the checkpoint at ``path`` (collective).

    The chunks are checked against the metadata first, so a mismatch is one CheckpointError on every rank
    that has it (not an exception wrapped by DCP)."""
    metadata = metadata if metadata is not None else read_metadata(path)
    agree_or_raise(lambda: check_chunks_against_metadata(metadata, chunks, path), process_group)
    reader = SafeFileSystemReader(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({}, storage_reader=reader, planner=ChunkLoadPlanner(chunks), process_group=process_group,
                 no_dist=not is_distributed())


def read_metadata(path: str) -> Metadata:
    """DCP metadata of ``path`` through the restricted unpickler (safe_metadata.py): no code runs from the file."""
    return load_metadata(path)


def tensor_index(path: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """{fqn: (global shape, stored dtype)} of every tensor in a checkpoint."""
    md = read_metadata(path)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def agree_or_raise(check: Callable[[], None], process_group=None) -> None:
    """Run ``check`` on every rank; if it fails anywhere, raise the same CheckpointError on all ranks
    (so no rank is left waiting in a collective that the others skipped)."""
    err = None
    try:
        check()
    except CheckpointError as e:
        err = str(e)
    if is_distributed():
        errs = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(errs, err, group=process_group)
        err = next((e for e in errs if e), None)
    if err:
        raise CheckpointError(err)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
