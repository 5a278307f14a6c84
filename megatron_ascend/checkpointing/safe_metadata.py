"""Reading torch.distributed.checkpoint's ``.metadata`` without running code from the file.

DCP stores its metadata (every tensor's global shape, dtype, stored boxes and file offsets) as a pickle, and
``FileSystemReader.read_metadata`` reads it with a plain ``pickle.load``: a crafted ``iter_*/.metadata`` would
run arbitrary code in ``pretrain --load``, ``tools/convert_ckpt.py --direction ma2hf`` and ``tools/reshard.py``.

Owns: ``load_metadata(path)`` / ``loads_metadata(bytes)``, an unpickler that admits only the classes DCP's
metadata is made of (the dataclasses of ``torch.distributed.checkpoint.metadata``, the file system's
``_StorageInfo``, ``torch.Size``, torch dtypes and layouts, ``pathlib`` paths for the recorded checkpoint id)
and refuses every other global, so no callable outside that list can be reached by ``REDUCE`` / ``NEWOBJ``;
and ``SafeFileSystemReader``, the DCP reader every load in this package goes through (``dcp.load`` reads the
metadata again itself). Why not JSON metadata of our own: DCP's format stays unchanged (readable by
torch's tools and by older releases of this package), and DCP's own reader keeps doing the reads; the
admitted classes are data holders whose construction runs no code of the file's choosing.

The result is also checked: it must be a ``Metadata`` whose storage entries name plain file names inside
the checkpoint directory (no ``/`` or ``..``: DCP joins them to the directory and opens them).
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Dict, FrozenSet, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from .errors import CheckpointError

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: Dict[str, FrozenSet[str]] = {
    _DCP_META: frozenset({"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                          "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # str -> torch.layout, from a table of torch's layouts
    "torch": frozenset({"Size"}),  # and torch.<dtype>, checked by type below
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where = where

    def find_class(self, module: str, name: str):
        if module == "torch" and name not in _ALLOWED["torch"]:
            obj = getattr(torch, name, None)
            if isinstance(obj, torch.dtype):
                return obj
        elif name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where} refers to {module}.{name}, which is not part of DCP's checkpoint "
                              f"metadata; the file is not a checkpoint this package wrote (it may be crafted to run "
                              f"code) - it was not loaded")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.where} holds a persistent reference, which DCP metadata never does; not loaded")


def _check(md, where: str) -> Metadata:
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{where} does not hold DCP metadata (found {type(md).__name__}); not loaded")
    for idx, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", "..") \
                or os.path.basename(rel) != rel:
            raise CheckpointError(f"{where}: tensor {getattr(idx, 'fqn', idx)} is stored in {rel!r}, not a file of the "
                                  f"checkpoint directory; not loaded")
    return md


def loads_metadata(data: bytes, where: str = ".metadata") -> Metadata:
    """Unpickle DCP metadata from bytes through the restricted unpickler (CheckpointError on anything else)."""
    try:
        md = _RestrictedUnpickler(io.BytesIO(data), where).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated / garbage: pickle raises many types
        raise CheckpointError(f"{where} is unreadable ({type(e).__name__}: {e}); the checkpoint is truncated or "
                              f"corrupt - load an older one or re-save") from None
    return _check(md, where)


def load_metadata(path: str) -> Metadata:
    """The DCP metadata of the checkpoint directory ``path`` (``path/.metadata``), read safely."""
    where = os.path.join(path, ".metadata")
    if not os.path.isfile(where):
        raise CheckpointError(f"{path} has no DCP .metadata file; it is not a complete checkpoint directory")
    with open(where, "rb") as f:
        return loads_metadata(f.read(), where)


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file-system reader with the metadata read through ``load_metadata`` (no unrestricted unpickle).

    Tensor data is read by DCP with ``torch.load(weights_only=True)``; byte (pickled object) items are never
    requested by this package's load planner."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = load_metadata(str(self.path))
        if getattr(md, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def allowed_globals() -> Tuple[str, ...]:
    """The admitted ``module.name`` globals (documentation and tests)."""
    return tuple(sorted(f"{m}.{n}" for m, names in _ALLOWED.items() for n in names)) + ("torch.<dtype>",)
