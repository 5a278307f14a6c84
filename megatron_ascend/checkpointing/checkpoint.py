"""Sharded save / load of a training run, with resharding, atomic commit, retention and async save.

Directory format (docs/CHECKPOINTS.md has the full description)::

    <save_dir>/latest_checkpointed_iteration.txt      "1200" (or "release"), written last (tmp + os.replace)
    <save_dir>/iter_0001200/.metadata                 DCP metadata: every tensor's global shape and stored boxes
    <save_dir>/iter_0001200/__<rank>_0.distcp          DCP data, one file per writing rank
    <save_dir>/iter_0001200/common.json               non-tensor state; written after the DCP files: completion marker

Every tensor is stored in global coordinates under a layout-independent key (the model's own parameter
names; ``optimizer/<param>/<state>``; ``rng/<global rank>/<kind>``), so a checkpoint saved at one
(TP, PP, EP, DP, distributed-optimizer) layout loads at any other: DCP reads, for each local box, the
overlapping parts of the stored boxes. Replicated tensors are written by one replica only.

Commit protocol: all ranks write into ``iter_N.tmp``; after a barrier rank 0 writes ``common.json`` into it,
renames it to ``iter_N``, then replaces the tracker. A run killed at any point leaves either the old tracker
and an ignored ``.tmp`` directory, or a complete new checkpoint. ``load_checkpoint`` reads the tracker and
falls back to the newest complete ``iter_*`` directory (with a warning) when the tracker is missing or points
at something incomplete; ``*.tmp`` directories and directories without ``common.json`` are never loaded.

RNG states are saved per global rank and restored only when the saved layout equals the current one
(Megatron's behaviour); otherwise the current (seeded) RNG is kept and a warning is logged.

Not here: the trainer's choice of when to save (training/), the HF formats (hf.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .dcp_io import Chunk, CheckpointError, agree_or_raise, is_distributed, read_chunks, read_metadata, write_chunks
from . import state as st

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common.json"
FORMAT = "megatron_ascend.dcp"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")

# Test-only fault injection: called with a stage name ("after_write", "before_rename", "before_tracker").
_FAULT_HOOK: Optional[Callable[[str], None]] = None


def _fault(stage: str) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(stage)


def checkpoint_dir(root: str, iteration) -> str:
    return os.path.join(root, "release" if iteration == "release" else f"iter_{int(iteration):07d}")


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _barrier(pg=None) -> None:
    if is_distributed():
        dist.barrier(group=pg)


def layout_of(groups) -> Dict[str, Any]:
    """The parallel layout a checkpoint was saved at (used to decide whether RNG states apply)."""
    if groups is None:
        world = dist.get_world_size() if is_distributed() else 1
        return {"world_size": world, "tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": 1, "dp": world, "vp": None,
                "distributed_optimizer": False}
    c = groups.config
    return {"world_size": c.world_size, "tp": c.tp, "pp": c.pp, "cp": c.cp, "ep": c.ep, "etp": c.etp, "dp": c.dp,
            "vp": c.virtual_pipeline_model_parallel_size or c.num_layers_per_virtual_pipeline_stage,
            "distributed_optimizer": bool(c.use_distributed_optimizer)}


def _json_default(x):
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(type(x).__name__)


def _to_json(obj: Dict[str, Any]) -> str:
    try:
        return json.dumps(obj, default=_json_default, indent=1, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"checkpoint state holds a value of type {e} that is not JSON serialisable; keep "
                              f"extra_state / scheduler / optimizer hyper-parameters to numbers, strings, lists, dicts")


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_complete(path: str) -> bool:
    return (os.path.isdir(path) and not path.rstrip("/").endswith(".tmp")
            and os.path.isfile(os.path.join(path, COMMON)) and os.path.isfile(os.path.join(path, ".metadata")))


def complete_checkpoints(root: str) -> Dict[int, str]:
    out = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _ITER_RE.match(name)
            if m and is_complete(os.path.join(root, name)):
                out[int(m.group(1))] = os.path.join(root, name)
    return out


def read_tracker(root: str):
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or delete it")


def find_checkpoint(root: str) -> Tuple[Optional[str], Any]:
    """(directory, iteration) of the checkpoint to load from ``root``, or (None, None) when ``root`` holds none.

    ``root`` may also be one checkpoint directory itself."""
    if is_complete(root):
        with open(os.path.join(root, COMMON)) as f:
            return root, json.load(f)["iteration"]
    if not os.path.isdir(root):
        return None, None
    tracked = read_tracker(root)
    if tracked is not None and is_complete(checkpoint_dir(root, tracked)):
        return checkpoint_dir(root, tracked), tracked
    complete = complete_checkpoints(root)
    if complete:
        it = max(complete)
        logger.warning("%s: tracker %s; loading the newest complete checkpoint iter %d",
                       root, "missing" if tracked is None else f"points at incomplete/missing {tracked}", it)
        return complete[it], it
    leftovers = [n for n in os.listdir(root) if n.startswith("iter_") or n == "release"]
    if tracked is not None or leftovers:
        raise CheckpointError(f"{root} holds no complete checkpoint (tracker: {tracked}, found: "
                              f"{', '.join(sorted(leftovers)[:5]) or 'nothing'}); a save was interrupted before its "
                              f"first commit - point --load at another directory or delete these")
    return None, None


# ---------------------------------------------------------------------------------------------- save
class _Pending:
    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None


_PENDING = _Pending()
_ASYNC_GROUP = None


def wait_for_pending_save() -> None:
    """Block until an async save in flight has committed; re-raise its error here."""
    if _PENDING.thread is not None:
        _PENDING.thread.join()
        _PENDING.thread = None
        err, _PENDING.error = _PENDING.error, None
        if err is not None:
            raise CheckpointError(f"the previous async checkpoint save failed: {err}") from err


def _retain(root: str, keep: Optional[int], newest: int) -> None:
    for name in os.listdir(root):  # leftovers of interrupted saves (only one save is ever in flight)
        if name.endswith(".tmp") or name.endswith(".old"):
            if name.startswith("iter_") and not name.startswith(os.path.basename(checkpoint_dir(root, newest))):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep is None or keep <= 0:
        return
    its = sorted(complete_checkpoints(root))
    for it in its[:-keep] if len(its) > keep else []:
        if it != newest:
            shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)


def prepare_tmp(root: str, iteration) -> str:
    """An empty ``<iteration dir>.tmp`` under ``root`` to write a checkpoint into (one process)."""
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_checkpoint(root: str, iteration, tmp: str, common_text: str, retain: Optional[int] = None) -> str:
    """One process: write common.json into the fully written ``tmp``, then swap it into place atomically --
    fsync, rename over the iteration directory (a re-saved iteration is kept as ``.old`` until the swap),
    fsync, then the tracker -- and apply ``retain``. An interruption at any point leaves the tracker at the
    previous complete checkpoint. Returns the committed directory."""
    final = checkpoint_dir(root, iteration)
    _write_text(os.path.join(tmp, COMMON), common_text)
    _fsync_dir(tmp)
    _fault("before_rename")
    old = final + ".old"
    if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): keep it until the swap
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _fault("before_tracker")
    _write_text(os.path.join(root, TRACKER), str(iteration))
    shutil.rmtree(old, ignore_errors=True)
    if iteration != "release":
        _retain(root, retain, int(iteration))
    return final


def _write_and_commit(root: str, iteration, chunks: List[Chunk], common_text: str, pg,
                      retain: Optional[int]) -> None:
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    write_chunks(tmp, chunks, process_group=pg)
    _fault("after_write")
    _barrier(pg)
    if _rank() == 0:
        commit_checkpoint(root, iteration, tmp, common_text, retain)
    _barrier(pg)


def _async_worker(*args) -> None:
    try:
        _write_and_commit(*args)
    except BaseException as e:  # surfaced by wait_for_pending_save()
        _PENDING.error = e


def save_checkpoint(save_dir: str, iteration, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    scheduler=None, groups=None, extra_state: Optional[Dict[str, Any]] = None, *,
                    save_retain: Optional[int] = None, async_save: bool = False, model_config=None,
                    save_optim: bool = True, save_rng: bool = True) -> str:
    """Save a checkpoint of ``iteration`` under ``save_dir`` (collective: every rank calls it).

    extra_state: JSON-serialisable trainer state (consumed samples, data iterator position ...), returned by
    load_checkpoint. save_retain: keep only the newest K complete checkpoints. async_save: stage every tensor
    to a CPU copy, then write and commit in a background thread over a dedicated gloo group; the next
    save / load (or ``wait_for_pending_save()``) waits for it. Returns the final checkpoint directory.
    """
    wait_for_pending_save()
    rank = _rank()
    chunks = st.model_chunks_of(model_chunks, for_save=True)
    has_optim = optimizer is not None and save_optim
    if has_optim:
        chunks += st.optimizer_chunks(optimizer, model_chunks)
    if save_rng:
        chunks += st.rng_chunks(rank)
    if model_config is None:
        model_config = next((getattr(st.unwrap(c), "config", None) for c in model_chunks
                             if dataclasses.is_dataclass(getattr(st.unwrap(c), "config", None))), None)
    common = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
        "layout": layout_of(groups), "has_optimizer": has_optim, "has_rng": save_rng,
        "optimizer": st.optimizer_common(optimizer) if has_optim else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra_state": dict(extra_state or {}),
        "model_config": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else model_config,
    }
    common_text = _to_json(common)  # fails on every rank alike, before any collective
    final = checkpoint_dir(save_dir, iteration)
    if rank == 0:
        prepare_tmp(save_dir, iteration)
    _barrier()
    if not async_save:
        _write_and_commit(save_dir, iteration, chunks, common_text, None, save_retain)
        return final
    global _ASYNC_GROUP
    if is_distributed() and _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    staged = [Chunk(c.fqn, c.global_shape, c.offsets, c.data().to("cpu", copy=True)) for c in chunks]
    _PENDING.thread = threading.Thread(target=_async_worker, name="ckpt-save", daemon=False,
                                       args=(save_dir, iteration, staged, common_text, _ASYNC_GROUP, save_retain))
    _PENDING.thread.start()
    return final


# ---------------------------------------------------------------------------------------------- load
def _agreed_checkpoint(load_dir: str):
    """Rank 0 picks the checkpoint; everyone gets the same answer (or the same error)."""
    pick = [None]
    if _rank() == 0:
        try:
            pick[0] = ("ok",) + find_checkpoint(load_dir)
        except CheckpointError as e:
            pick[0] = ("err", str(e), None)
    if is_distributed():
        dist.broadcast_object_list(pick, src=0)
    if pick[0][0] == "err":
        raise CheckpointError(pick[0][1])
    return pick[0][1], pick[0][2]


def read_common(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, COMMON)) as f:
        common = json.load(f)
    if common.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a megatron_ascend checkpoint (format {common.get('format')!r}); "
                              f"convert HF weights with tools/convert_ckpt.py --direction hf2ma")
    if common.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {common['format_version']}, newer than this code's "
                              f"{FORMAT_VERSION}; update megatron_ascend")
    return common


def load_checkpoint(load_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer=None, scheduler=None,
                    groups=None, finetune: bool = False, no_load_optim: bool = False,
                    no_load_rng: bool = False) -> Tuple[Any, Dict[str, Any]]:
    """Load the newest complete checkpoint under ``load_dir`` into the live objects (collective).

    Returns (iteration, extra_state); (0, {}) with a warning when ``load_dir`` holds no checkpoint at all
    (Megatron's behaviour, so --load == --save works on the first start). finetune: load the model weights
    only and return (0, {}). no_load_optim / no_load_rng: skip those parts. Any mismatch between the
    checkpoint and the model raises one CheckpointError on every rank."""
    wait_for_pending_save()
    path, iteration = _agreed_checkpoint(load_dir)
    if path is None:
        logger.warning("no checkpoint found in %s; starting from scratch", load_dir)
        return 0, {}
    common = read_common(path)
    md = read_metadata(path)
    chunks = st.model_chunks_of(model_chunks)

    if common.get("release"):  # converted weights (Megatron's "release"): no optimizer / RNG, iteration 0
        finetune = True
    load_optim = optimizer is not None and not finetune and not no_load_optim
    agree_or_raise(lambda: _require_optim(common, path) if load_optim else None)
    skipped = set()
    if load_optim:
        stored = md.state_dict_metadata
        saved_params = {k[len(st.OPT_PREFIX):].rsplit("/", 1)[0] for k in stored if k.startswith(st.OPT_PREFIX)}
        for c in st.optimizer_chunks(optimizer, model_chunks, for_load=True):
            pname = c.fqn[len(st.OPT_PREFIX):].rsplit("/", 1)[0]
            if pname not in saved_params:  # the saver held no state for it (never stepped): keep it fresh
                skipped.add(pname)
                continue
            if c.fqn.endswith("/main_param") and c.fqn not in stored:  # e.g. saved from fp32 params
                c = dataclasses.replace(c, fqn=pname)
            chunks.append(c)

    rng_targets = None
    if not finetune and not no_load_rng and common.get("has_rng"):
        if common.get("layout") != layout_of(groups):
            if _rank() == 0:
                logger.warning("checkpoint layout %s differs from the current %s: RNG states are not restored "
                               "(each rank keeps its current seeded RNG)", common.get("layout"), layout_of(groups))
        else:
            rchunks = st.rng_chunks(_rank())  # fresh tensors (rng_tensors copies every state): read into them
            ok = all(tuple(md.state_dict_metadata[c.fqn].size) == c.global_shape
                     for c in rchunks if c.fqn in md.state_dict_metadata)
            ok = ok and all(c.fqn in md.state_dict_metadata for c in rchunks if "/tracker_" not in c.fqn
                            and "/torch_device" not in c.fqn)
            rchunks = [c for c in rchunks if c.fqn in md.state_dict_metadata]
            if not _all_true(ok):
                logger.warning("RNG states in %s do not match this platform's; not restored", path)
                rng_targets = None
            else:
                chunks += rchunks
                rng_targets = {c.fqn.split("/", 2)[2]: c.tensor for c in rchunks}

    read_chunks(path, chunks, metadata=md)

    warnings = []
    if rng_targets is not None:
        st.restore_rng(rng_targets)
    if load_optim:
        st.drop_unloaded_state(optimizer, model_chunks, skipped)
        if common.get("optimizer") is not None:
            warnings += st.load_optimizer_common(optimizer, common["optimizer"])
    if scheduler is not None and not finetune and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    for w in warnings:
        if _rank() == 0:
            logger.warning(w)
    _barrier()
    if finetune:
        return 0, {}
    return common["iteration"], common.get("extra_state", {})


def _require_optim(common, path) -> None:
    if not common.get("has_optimizer"):
        raise CheckpointError(f"checkpoint {path} has no optimizer state (saved without it, or converted from "
                              f"HuggingFace); pass --no-load-optim (or --finetune) to start the optimizer fresh")


def _all_true(flag: bool) -> bool:
    if not is_distributed():
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)
