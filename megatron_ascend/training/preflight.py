"""Checks of the paths a run will write or read, before any process group, model or dataset exists.

Owns ``check_paths(train_cfg)``, ``check_data(data_cfg, sft)`` and ``check_schedule(opt_cfg, train_cfg)``.

``check_paths``: ``--save`` and ``--tensorboard-dir`` must be writable (a probe file is
created and removed in the directory, or in its nearest existing parent when the directory does not exist
yet, so a failed check leaves nothing behind), and ``--load`` must exist unless it is also ``--save`` (the
usual pattern, where an empty or missing directory means "first start"). A HuggingFace model directory given
to ``--load`` is recognised by the checkpoint package (selection.py) with the conversion command.

``check_data``: every ``--data-path`` prefix has its ``.bin`` and ``.idx`` (the contents are checked when the
datasets are built), and ``--mock-data`` is not combined with ``--data-path``.

``check_schedule``: the learning-rate schedule's rules (decay longer than warm-up, WSD lengths ...), checked by
building the scheduler on a stand-in optimizer, so they fail before the model is built.

Each problem is one ConfigError naming the flag, the path and the fix, so a run that cannot save is refused
before it trains instead of failing at its first checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from ..config import ConfigError, DataConfig, OptimizerConfig, TrainingConfig


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_writable(flag: str, path: Optional[str]) -> None:
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; pass a directory path")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise ConfigError(f"{flag} {path!r}: {base!r} is a file, so the directory cannot be created; pass another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ma_write_probe_", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if base == os.path.abspath(path) else f" (its nearest existing parent {base!r})"
        raise ConfigError(f"{flag} {path!r} is not writable{where}: {e.strerror or e}; pass a writable directory "
                          f"or fix its permissions") from None


def check_paths(t: TrainingConfig) -> None:
    check_writable("--save", t.save)
    check_writable("--tensorboard-dir", t.tensorboard_dir)
    if t.load:
        same = t.save and os.path.abspath(t.load) == os.path.abspath(t.save)
        if not os.path.exists(t.load) and not same:
            raise ConfigError(f"--load {t.load!r} does not exist; pass the --save directory of an earlier run (or the "
                              f"same directory as --save to resume automatically), or drop --load to start from "
                              f"scratch")
        if os.path.exists(t.load) and not os.path.isdir(t.load):
            raise ConfigError(f"--load {t.load!r} is a file; pass a checkpoint directory (the --save of a run)")
        from ..checkpointing.selection import hf_dir_message, looks_like_hf_dir
        if os.path.isdir(t.load) and looks_like_hf_dir(t.load):
            raise ConfigError(hf_dir_message(t.load))


def check_data(d: DataConfig, sft: bool = False) -> None:
    if d.mock_data and d.data_path:
        raise ConfigError(f"--mock-data and --data-path {' '.join(d.data_path)} contradict each other; drop one "
                          f"(--mock-data trains on random tokens)")
    if d.mock_data:
        return
    if not d.data_path:
        raise ConfigError("no training data: pass --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    from ..data.blended_dataset import parse_data_path
    from ..data.errors import DataError
    try:
        _, prefixes = parse_data_path(list(d.data_path))
    except DataError as e:
        raise ConfigError(str(e)) from None
    for p in prefixes:
        if sft or d.sft:
            continue  # SFT prefixes name two datasets (ids and mask); the SFT dataset checks them
        missing = [p + ext for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
        if missing:
            raise ConfigError(f"--data-path {p}: {' and '.join(missing)} not found; pass the prefix "
                              f"tools/preprocess_data.py wrote (e.g. out/corpus_text_document, without .bin/.idx)")


class _NoParams:
    param_groups: list = []


def check_schedule(o: OptimizerConfig, t: TrainingConfig) -> None:
    from ..optimizer import OptimizerParamScheduler
    iters = t.train_iters
    try:
        OptimizerParamScheduler(_NoParams(), o, iters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
