"""SHA-256 of the data files a run reads, streamed, and cached by (path, size, mtime) so a big corpus is hashed
once per change, not at every start.

``data_files(data_path, sft)`` lists the ``.bin`` / ``.idx`` files behind ``--data-path`` (weights dropped; SFT
prefixes expand to their input-ids and loss-mask pairs). ``file_sha256(path)`` hashes one file through the
cache. ``data_checksum(files)`` is the run's data fingerprint: SHA-256 over the sorted "name sha256" lines of
the files, so it does not depend on where the data lives, only on the bytes and the file names.

The cache is one JSON file, ``$MEGATRON_ASCEND_CACHE`` or ``$XDG_CACHE_HOME/megatron_ascend`` (default
``~/.cache/megatron_ascend``) ``/checksums.json``, written atomically; an unreadable cache is ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

CHUNK = 1 << 22


def cache_path() -> str:
    base = os.environ.get("MEGATRON_ASCEND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "megatron_ascend")
    return os.path.join(base, "checksums.json")


def _load_cache() -> Dict[str, dict]:
    try:
        with open(cache_path()) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: Dict[str, dict]) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = _load_cache()
        merged.update(entries)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is not a reason to fail a run


def stream_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _key(path: str):
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def cached_sha256(path: str, cache: Optional[Dict[str, dict]] = None) -> Optional[str]:
    """The cached hash if the file's size and mtime still match, else None."""
    real, size, mtime = _key(path)
    e = (cache if cache is not None else _load_cache()).get(real)
    if e and e.get("size") == size and e.get("mtime_ns") == mtime:
        return e.get("sha256")
    return None


def file_sha256(path: str) -> str:
    """SHA-256 of ``path`` (hex), from the cache when size and mtime are unchanged."""
    hit = cached_sha256(path)
    if hit:
        return hit
    real, size, mtime = _key(path)
    digest = stream_sha256(path)
    _save_cache({real: {"size": size, "mtime_ns": mtime, "sha256": digest}})
    return digest


def data_files(data_path: Sequence[str], sft: bool = False) -> List[str]:
    """The .bin / .idx files of ``--data-path`` (prefixes as the trainer reads them), in order."""
    from ..data.blended_dataset import parse_data_path
    _, prefixes = parse_data_path(list(data_path))
    out: List[str] = []
    for p in prefixes:
        if sft:
            from ..data.sft_format import INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX
            base = p
            for suf in (INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX):
                if base.endswith(suf):
                    base = base[: -len(suf)]
            stems = [base + INPUT_IDS_SUFFIX, base + LOSS_MASK_SUFFIX]
        else:
            stems = [p[:-4] if p.endswith((".bin", ".idx")) else p]
        for s in stems:
            out += [s + ".bin", s + ".idx"]
    return out


def data_checksum(hashes: Dict[str, str]) -> str:
    """One fingerprint over {file path: sha256}: independent of the directory the files live in."""
    lines = sorted(f"{os.path.basename(p)} {h}" for p, h in hashes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
