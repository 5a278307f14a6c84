"""Hashed, atomic ``.npy`` caches for dataset indices (document / sample / shuffle / blending indices).

Owns: the cache key (an md5 of a JSON description of every input that shapes the indices, including a
fingerprint of the .idx contents, so a changed corpus, seq-length, seed, split or sample count gets new
files), the atomic write (tmp name then ``os.replace``), ``np.load(allow_pickle=False)`` on read, and the
distributed protocol: global rank 0 builds while the others wait on a barrier, then every rank loads;
a rank that still finds no files (node-local disks, no shared filesystem) builds its own copy, which is
identical because the build is deterministic.

Layout: ``<cache_dir>/<md5>-<kind>-<name>.npy`` plus ``<md5>-<kind>-description.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)
_warned_dirs = set()


def fingerprint_index(ds) -> str:
    """md5 of what the indices depend on in an IndexedDataset: its dtype and sequence/document tables
    (computed once per reader object)."""
    cached = getattr(ds, "_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.md5()
    h.update(str(ds.dtype).encode())
    h.update(np.ascontiguousarray(ds.sequence_lengths).tobytes())
    h.update(np.ascontiguousarray(ds.document_indices).tobytes())
    ds._fingerprint = h.hexdigest()
    return ds._fingerprint


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _dist_rank():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist
    except ImportError:  # pragma: no cover
        pass
    return 0, None


def _paths(cache_dir: str, key: str, kind: str, names: Sequence[str]) -> Dict[str, str]:
    return {n: os.path.join(cache_dir, f"{key}-{kind}-{n}.npy") for n in names}


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _try_load(paths: Dict[str, str]) -> Optional[Dict[str, np.ndarray]]:
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        return {n: np.load(p, allow_pickle=False, mmap_mode="r") for n, p in paths.items()}
    except (ValueError, OSError) as e:  # a damaged cache file: rebuild it
        logger.warning("dataset index cache %s is unreadable (%s); rebuilding", list(paths.values())[0], e)
        return None


def _ensure(cache_dir: Optional[str], key: str, kind: str, names: Sequence[str], description: dict,
            build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    if cache_dir is None:
        return build()
    paths = _paths(cache_dir, key, kind, names)
    got = _try_load(paths)
    if got is not None:
        return got
    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        desc_path = os.path.join(cache_dir, f"{key}-{kind}-description.json")
        tmp = f"{desc_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(description, f, indent=1, sort_keys=True)
        os.replace(tmp, desc_path)
        for n in names:
            _save_atomic(paths[n], arrays[n])  # the description first, the arrays last: arrays present = complete
    except OSError as e:
        if cache_dir not in _warned_dirs:
            _warned_dirs.add(cache_dir)
            logger.warning("cannot write dataset index cache in %s (%s); indices are rebuilt in memory each run; "
                           "pass a writable cache dir to keep them", cache_dir, e)
    return arrays


def load_or_build(cache_dir: Optional[str], kind: str, names: Sequence[str], description: dict,
                  build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Return the arrays ``names`` for ``description``: from the cache when present, else built (and saved)."""
    key = description_hash(description)
    rank, dist = _dist_rank()
    if dist is None:
        return _ensure(cache_dir, key, kind, names, description, build)
    arrays = _ensure(cache_dir, key, kind, names, description, build) if rank == 0 else None
    dist.barrier()
    if rank != 0:
        arrays = _ensure(cache_dir, key, kind, names, description, build)
    return arrays
