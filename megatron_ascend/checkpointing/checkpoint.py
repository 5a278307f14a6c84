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

Commit protocol: all ranks write into ``iter_N.tmp`` (hashing each data file as it is written,
integrity.py); rank 0 gathers the file records, writes ``common.json`` (with every file's size and SHA-256 and
its own checksum) into it, renames it to ``iter_N``, then replaces the tracker. A run killed at any point
leaves either the old tracker and an ignored ``.tmp`` directory, or a complete new checkpoint.

Load (selection.py, compat.py): the tracker's checkpoint, else the newest complete ``iter_*``; each candidate
is verified (common.json, sizes, checksums, metadata) before any tensor is read and a bad one is skipped for
the next older one with a warning; the model's tensors and the LR schedule must match the checkpoint's.
``*.tmp`` directories and directories without ``common.json`` are never loaded.

RNG states are saved per global rank and restored only when the saved layout equals the current one
(Megatron's behaviour); otherwise the current (seeded) RNG is kept and a warning is logged.

Not here: the trainer's choice of when to save (training/), the HF formats (hf.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .dcp_io import Chunk, CheckpointError, agree_or_raise, is_distributed, read_chunks, write_chunks
from . import compat
from . import state as st
from .integrity import file_record, seal_common
from .selection import COMMON, TRACKER, VERIFY_MODES, checkpoint_dir, complete_checkpoints, pick_checkpoint
from .selection import FORMAT, FORMAT_VERSION, find_checkpoint, read_common  # noqa: F401  (hf.py imports them here)

logger = logging.getLogger(__name__)

# Test-only fault injection: called with a stage name ("after_write", "before_rename", "before_tracker").
_FAULT_HOOK: Optional[Callable[[str], None]] = None


def _fault(stage: str) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(stage)


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


def _file_records(tmp: str, known: Optional[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Size and SHA-256 of every file the checkpoint directory holds (those hashed while written are reused)."""
    known = dict(known or {})
    out = {}
    for name in sorted(os.listdir(tmp)):
        fp = os.path.join(tmp, name)
        if name == COMMON or not os.path.isfile(fp) or name.endswith(".tmp"):
            continue
        rec = known.get(name)
        out[name] = rec if rec is not None and rec["bytes"] == os.path.getsize(fp) else file_record(fp)
    return out


def commit_checkpoint(root: str, iteration, tmp: str, common, retain: Optional[int] = None,
                      files: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """One process: record every file's size and SHA-256 in ``common`` (a dict, or its JSON text; ``files``:
    records already computed while writing), seal it with its own checksum, write common.json into the fully
    written ``tmp``, then swap it into place atomically -- fsync, rename over the iteration directory (a re-saved
    iteration is kept as ``.old`` until the swap), fsync, then the tracker -- and apply ``retain``. An
    interruption at any point leaves the tracker at the previous complete checkpoint. Returns the committed
    directory."""
    if isinstance(common, str):
        common = json.loads(common)
    final = checkpoint_dir(root, iteration)
    common = seal_common(dict(common, files=_file_records(tmp, files)))
    _write_text(os.path.join(tmp, COMMON), _to_json(common))
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


def _gather_records(records: Dict[str, Dict[str, Any]], pg) -> Dict[str, Dict[str, Any]]:
    if not is_distributed():
        return dict(records)
    parts: List[Optional[Dict[str, Dict[str, Any]]]] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(parts, records, group=pg)
    out: Dict[str, Dict[str, Any]] = {}
    for p in parts:
        out.update(p or {})
    return out


def _write_and_commit(root: str, iteration, chunks: List[Chunk], common: Dict[str, Any], pg,
                      retain: Optional[int]) -> None:
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    records = write_chunks(tmp, chunks, process_group=pg)
    _fault("after_write")
    records = _gather_records(records, pg)  # (a collective: every rank has finished writing)
    if _rank() == 0:
        commit_checkpoint(root, iteration, tmp, common, retain, files=records)
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
    model_config = _model_config_of(model_chunks, model_config)
    common = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
        "layout": layout_of(groups), "has_optimizer": has_optim, "has_rng": save_rng,
        "optimizer": st.optimizer_common(optimizer) if has_optim else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra_state": dict(extra_state or {}),
        "model_config": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else model_config,
    }
    _to_json(common)  # a value JSON cannot hold fails on every rank alike, before any collective
    final = checkpoint_dir(save_dir, iteration)
    if rank == 0:
        prepare_tmp(save_dir, iteration)
    _barrier()
    if not async_save:
        _write_and_commit(save_dir, iteration, chunks, common, None, save_retain)
        return final
    global _ASYNC_GROUP
    if is_distributed() and _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    staged = [Chunk(c.fqn, c.global_shape, c.offsets, c.data().to("cpu", copy=True)) for c in chunks]
    _PENDING.thread = threading.Thread(target=_async_worker, name="ckpt-save", daemon=False,
                                       args=(save_dir, iteration, staged, common, _ASYNC_GROUP, save_retain))
    _PENDING.thread.start()
    return final


# ---------------------------------------------------------------------------------------------- load
def _model_config_of(model_chunks, model_config=None):
    if model_config is not None:
        return model_config
    return next((getattr(st.unwrap(c), "config", None) for c in model_chunks
                 if dataclasses.is_dataclass(getattr(st.unwrap(c), "config", None))), None)


def load_checkpoint(load_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer=None, scheduler=None,
                    groups=None, finetune: bool = False, no_load_optim: bool = False,
                    no_load_rng: bool = False, *, verify: str = "checksum", fallback: bool = True,
                    override_scheduler: bool = False, use_checkpoint_scheduler: bool = False,
                    model_config=None) -> Tuple[Any, Dict[str, Any]]:
    """Load the newest intact checkpoint under ``load_dir`` into the live objects (collective).

    Returns (iteration, extra_state); (0, {}) with a warning when ``load_dir`` holds no checkpoint at all
    (Megatron's behaviour, so --load == --save works on the first start). finetune: load the model weights
    only and return (0, {}). no_load_optim / no_load_rng: skip those parts.

    Before any tensor is read (selection.pick_checkpoint, compat): common.json and every recorded file's size
    (and with verify="checksum" its SHA-256, the hashing spread over the ranks) are checked, a bad checkpoint
    is skipped for the next older one with a warning (``fallback=False``: refused); the stored model tensors
    must be exactly the model's; the learning-rate schedule must match unless ``override_scheduler`` (keep
    this run's) or ``use_checkpoint_scheduler`` (take the checkpoint's). Every failure is one CheckpointError
    on every rank, naming the file or the values and the fix."""
    if verify not in VERIFY_MODES:
        raise CheckpointError(f"checkpoint verify mode {verify!r} is unknown; use {' or '.join(VERIFY_MODES)}")
    if override_scheduler and use_checkpoint_scheduler:
        raise CheckpointError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are both "
                              "set; pick one")
    wait_for_pending_save()
    path, iteration, common, md = pick_checkpoint(load_dir, verify, fallback)
    if path is None:
        logger.warning("no checkpoint found in %s; starting from scratch", load_dir)
        return 0, {}
    chunks = st.model_chunks_of(model_chunks)

    stored_model = {k: tuple(v.size) for k, v in md.state_dict_metadata.items()
                    if "/" not in k and isinstance(v, TensorStorageMetadata)}
    model = compat.union_over_ranks({c.fqn: c.global_shape for c in chunks})
    if common.get("release"):  # converted weights (Megatron's "release"): no optimizer / RNG, iteration 0
        finetune = True
    warnings = compat.check_model(path, stored_model, model, common.get("model_config"),
                                  _model_config_of(model_chunks, model_config),
                                  droppable=("mtp.",) if finetune else ())
    use_sched = scheduler is not None and not finetune and common.get("scheduler") is not None
    if use_sched:
        diff = getattr(scheduler, "settings_diff", None)  # ours; a torch LR scheduler just loads its state
        note = compat.check_schedule(path, diff(common["scheduler"]) if diff else [], override_scheduler,
                                     use_checkpoint_scheduler)
        if note:
            warnings.append(note)
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

    if rng_targets is not None:
        st.restore_rng(rng_targets)
    if load_optim:
        st.drop_unloaded_state(optimizer, model_chunks, skipped)
        if common.get("optimizer") is not None:
            warnings += st.load_optimizer_common(optimizer, common["optimizer"])
    if use_sched:
        if hasattr(scheduler, "settings_diff"):
            scheduler.load_state_dict(common["scheduler"], use_checkpoint_settings=use_checkpoint_scheduler)
        else:
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
