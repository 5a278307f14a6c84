"""Checks of the paths a run will write or read, before any process group, model or dataset exists.

Owns ``check_paths(train_cfg)``: ``--save`` and ``--tensorboard-dir`` must be writable (a probe file is
created and removed in the directory, or in its nearest existing parent when the directory does not exist
yet, so a failed check leaves nothing behind), and ``--load`` must exist unless it is also ``--save`` (the
usual pattern, where an empty or missing directory means "first start"). A HuggingFace model directory given
to ``--load`` is recognised by the checkpoint package (selection.py) with the conversion command.

Each problem is one ConfigError naming the flag, the path and the fix, so a run that cannot save is refused
before it trains instead of failing at its first checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from ..config import ConfigError, TrainingConfig


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
