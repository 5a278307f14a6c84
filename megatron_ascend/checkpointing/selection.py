"""Which checkpoint to load: the directory layout's names, the candidates under a ``--load`` directory, and the
checks that make one usable (complete, intact, readable), with fallback to an older one.

Owns: the names (tracker, ``iter_XXXXXXX``, ``common.json``), ``read_common`` (format, version and the file's
own checksum), ``checkpoint_candidates`` (the tracker's checkpoint first, then every other complete
``iter_*`` newest first), ``validate`` (common.json, every recorded file's size and SHA-256, the DCP metadata
through the restricted unpickler), ``find_checkpoint`` (one process: tools) and ``pick_checkpoint`` (all
ranks, the hashing spread over them: the trainer's load). A candidate that fails validation is skipped for the
next older one, with a warning naming the bad file once an older one loads (when none does, one error says
why), unless ``fallback`` is off (``--no-ckpt-fallback``).

A HuggingFace model directory given as a checkpoint is recognised and the conversion command suggested.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from .errors import CheckpointError
from .integrity import check_common, verify_files
from .safe_metadata import load_metadata

logger = logging.getLogger("megatron_ascend.checkpointing")

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common.json"
FORMAT = "megatron_ascend.dcp"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
VERIFY_MODES = ("checksum", "size")


def checkpoint_dir(root: str, iteration) -> str:
    return os.path.join(root, "release" if iteration == "release" else f"iter_{int(iteration):07d}")


def is_complete(path: str) -> bool:
    """Committed (not a ``.tmp``) and holding both completion files; says nothing about intactness."""
    return (os.path.isdir(path) and not path.rstrip("/").endswith(".tmp")
            and os.path.isfile(os.path.join(path, COMMON)) and os.path.isfile(os.path.join(path, ".metadata")))


_OLD_RE = re.compile(r"^iter_(\d{7,})\.old$")


def complete_checkpoints(root: str) -> Dict[int, str]:
    """{iteration: directory} of the complete checkpoints under ``root``. An ``iter_N.old`` (a re-saved
    iteration's previous copy, kept until the new one is renamed into place) counts when ``iter_N`` is gone:
    a kill between the two renames leaves it as the only complete copy."""
    out, old = {}, {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            m, o = _ITER_RE.match(name), _OLD_RE.match(name)
            if m and is_complete(os.path.join(root, name)):
                out[int(m.group(1))] = os.path.join(root, name)
            elif o and is_complete(os.path.join(root, name)):
                old[int(o.group(1))] = os.path.join(root, name)
    for it, path in old.items():
        out.setdefault(it, path)
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
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or delete it") from None


def looks_like_hf_dir(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in os.listdir(path))


def hf_dir_message(path: str) -> str:
    return (f"{path} is a HuggingFace model directory (config.json + safetensors), not a megatron_ascend "
            f"checkpoint; convert it first: python tools/convert_ckpt.py --direction hf2ma --load-dir {path} "
            f"--save-dir {path.rstrip('/')}_ma, then pass --load {path.rstrip('/')}_ma --finetune")


def read_common(path: str) -> Dict[str, Any]:
    where = os.path.join(path, COMMON)
    try:
        with open(where) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} cannot be read ({e}); the checkpoint is incomplete or corrupt") from None
    common = check_common(text, where)
    if common.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a megatron_ascend checkpoint (format {common.get('format')!r}); "
                              f"convert HF weights with tools/convert_ckpt.py --direction hf2ma")
    if common.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {common['format_version']}, newer than this code's "
                              f"{FORMAT_VERSION}; update megatron_ascend")
    if "iteration" not in common:
        raise CheckpointError(f"{where} records no iteration; the checkpoint is corrupt")
    return common


def checkpoint_candidates(root: str, partial_ok: bool = False) -> List[str]:
    """Complete checkpoint directories under ``root`` in the order to try them: the tracker's, then the others
    newest first. ``root`` may be one checkpoint directory. [] when ``root`` holds nothing at all; a
    CheckpointError when it holds only interrupted saves (``partial_ok``: a warning and [] when there is no
    tracker either: the first save of a run that is now restarted with --load == --save), or is a HuggingFace
    directory."""
    if is_complete(root):
        return [root]
    if not os.path.isdir(root):
        return []
    if looks_like_hf_dir(root):
        raise CheckpointError(hf_dir_message(root))
    try:
        tracked = read_tracker(root)
        bad_tracker = None
    except CheckpointError as e:
        tracked, bad_tracker = None, str(e)
    complete = complete_checkpoints(root)
    out = []
    if tracked is not None and is_complete(checkpoint_dir(root, tracked)):
        out.append(checkpoint_dir(root, tracked))
    elif complete:
        why = bad_tracker or ("tracker missing" if tracked is None else f"tracker points at incomplete/missing {tracked}")
        logger.warning("%s: %s; trying the newest complete checkpoint iter %d", root, why, max(complete))
    out += [complete[it] for it in sorted(complete, reverse=True) if complete[it] not in out]
    if out:
        return out
    leftovers = [n for n in os.listdir(root) if n.startswith("iter_") or n == "release"]
    if bad_tracker:
        raise CheckpointError(bad_tracker)
    if partial_ok and tracked is None and all(n.endswith((".tmp", ".old")) for n in leftovers):
        logger.warning("%s holds only interrupted saves (%s); starting from scratch", root,
                       ", ".join(sorted(leftovers)[:3]))
        return []
    if tracked is not None or leftovers:
        raise CheckpointError(f"{root} holds no complete checkpoint (tracker: {tracked}, found: "
                              f"{', '.join(sorted(leftovers)[:5]) or 'nothing'}); a save was interrupted before its "
                              f"first commit - point --load at another directory or delete these")
    return []


def validate(path: str, verify: str = "checksum") -> Tuple[Dict[str, Any], Any]:
    """One process: (common, metadata) of an intact checkpoint, else CheckpointError naming the bad file."""
    common = read_common(path)
    err = verify_files(path, common.get("files"), verify, collective=False)
    if err:
        raise CheckpointError(err)
    return common, load_metadata(path)


def _iteration_of(path: str, common: Dict[str, Any]):
    return "release" if os.path.basename(path.rstrip("/")) == "release" else common["iteration"]


def _no_records_note(path: str, common: Dict[str, Any]) -> None:
    if common.get("files") is None:
        logger.warning("%s records no file sizes / checksums (saved before they were recorded); its files are "
                       "not verified", path)


def _fallback_error(path: str, err: str) -> CheckpointError:
    return CheckpointError(f"{err}; --no-ckpt-fallback is set, so the older checkpoints are not tried: drop it to "
                           f"fall back, or move {path} away")


def find_checkpoint(root: str, verify: Optional[str] = "checksum", fallback: bool = True) -> Tuple[Optional[str], Any]:
    """(directory, iteration) of the newest usable checkpoint under ``root`` (one process), or (None, None)
    when ``root`` holds none. verify: None (completion files only), "size" or "checksum"."""
    cands = checkpoint_candidates(root)
    errors = []
    for path in cands:
        try:
            if verify is None:
                common = read_common(path)
            else:
                common, _ = validate(path, verify)
                _no_records_note(path, common)
        except CheckpointError as e:
            if not fallback:
                raise _fallback_error(path, str(e)) from None
            errors.append((path, str(e)))
            continue
        _warn_skipped(errors, path)
        return path, _iteration_of(path, common)
    if errors:
        raise _none_intact(root, errors)
    return None, None


def _warn_skipped(errors, loaded: str) -> None:
    """The skipped candidates are reported once one loads (when none does, the error says it all)."""
    for path, err in errors:
        logger.warning("skipped checkpoint %s: %s; loading %s instead", path, err, loaded)


def _none_intact(root: str, errors) -> CheckpointError:
    more = f" (and {len(errors) - 1} older checkpoint(s) with problems too)" if len(errors) > 1 else ""
    return CheckpointError(f"no intact checkpoint under {root}: {errors[0][1]}{more}; restore the file or point "
                           f"--load at another checkpoint")


def _src0(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def pick_checkpoint(root: str, verify: str = "checksum", fallback: bool = True, group=None
                    ) -> Tuple[Optional[str], Any, Optional[Dict[str, Any]], Any]:
    """Collective over ``group`` (all ranks when distributed): (path, iteration, common, metadata) of the newest
    intact checkpoint, verified before any tensor is read; (None, None, None, None) when ``root`` holds none.
    Every rank gets the same answer or the same CheckpointError."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0

    def from_rank0(fn):
        box = [None]
        if rank == 0:
            try:
                box[0] = ("ok", fn())
            except CheckpointError as e:
                box[0] = ("err", str(e))
        if distributed:
            dist.broadcast_object_list(box, src=_src0(group), group=group)
        return box[0]

    status, cands = from_rank0(lambda: checkpoint_candidates(root))
    if status == "err":
        raise CheckpointError(cands)
    errors = []
    for path in cands:
        status, common = from_rank0(lambda: read_common(path))
        err = common if status == "err" else verify_files(path, common.get("files"), verify, group)
        md = None
        if err is None:
            try:
                md = load_metadata(path)
            except CheckpointError as e:
                err = str(e)
            if distributed:
                errs: List[Optional[str]] = [None] * dist.get_world_size(group)
                dist.all_gather_object(errs, err, group=group)
                err = next((e for e in errs if e), None)
        if err is None:
            if rank == 0:
                _warn_skipped(errors, path)
                _no_records_note(path, common)
            return path, _iteration_of(path, common), common, md
        if not fallback:
            raise _fallback_error(path, err)
        errors.append((path, err))
    if errors:
        raise _none_intact(root, errors)
    return None, None, None, None
