"""A training run as the reports read it: every TensorBoard scalar (step, value, wall time; no down-sampling),
``run_metadata.json`` and ``rank_stats.jsonl`` (monitoring/run_metadata.py) from one output directory."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


class ReportError(ValueError):
    """A run directory the reports cannot read, or runs that must not be compared; the message says why."""


@dataclass
class Series:
    steps: List[int]
    values: List[float]
    walls: List[float] = field(default_factory=list)

    def as_dict(self) -> Dict[int, float]:
        return dict(zip(self.steps, self.values))

    def __bool__(self) -> bool:
        return bool(self.steps)


@dataclass
class Run:
    label: str
    dir: str
    scalars: Dict[str, Series]
    meta: Optional[dict] = None
    rank_stats: List[dict] = field(default_factory=list)

    def series(self, tag: str) -> Series:
        return self.scalars.get(tag) or Series([], [], [])

    def meta_get(self, *path, default=None):
        d = self.meta
        for k in path:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d


def load_scalars(run_dir: str) -> Dict[str, Series]:
    """tag -> Series for every scalar of a TensorBoard directory; the latest event wins per step (a resumed run
    rewrites the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not os.path.isdir(run_dir):
        raise ReportError(f"run directory {run_dir!r} does not exist; pass the --tensorboard-dir of a run")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise ReportError(f"no TensorBoard scalars under {run_dir!r}; is it the --tensorboard-dir of a run?")
    out: Dict[str, Series] = {}
    for tag in tags:
        per_step: Dict[int, tuple] = {}
        for ev in acc.Scalars(tag):
            per_step[int(ev.step)] = (float(ev.value), float(ev.wall_time))
        steps = sorted(per_step)
        out[tag] = Series(steps, [per_step[s][0] for s in steps], [per_step[s][1] for s in steps])
    return out


def load_rank_stats(run_dir: str) -> List[dict]:
    from ..run_metadata import RANK_STATS_FILE
    path = os.path.join(run_dir, RANK_STATS_FILE)
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a crash
    except FileNotFoundError:
        pass
    return out


def load_run(run_dir: str, label: Optional[str] = None) -> Run:
    from ..run_metadata import read_metadata
    try:
        meta = read_metadata(run_dir) if os.path.isdir(run_dir) else None
    except ValueError as e:
        raise ReportError(f"{run_dir}/run_metadata.json is not valid JSON ({e})")
    return Run(label or default_label(run_dir), run_dir, load_scalars(run_dir), meta, load_rank_stats(run_dir))


def default_label(run_dir: str, parts: int = 1) -> str:
    """The run directory's name (its parent's for a ``tensorboard`` / ``tb`` directory); ``parts`` = 2 adds the
    directory above (bench/reference/run.sh's RECIPE/TAG)."""
    d = os.path.normpath(os.path.abspath(run_dir))
    if os.path.basename(d) in ("tensorboard", "tb") and os.path.dirname(d):
        d = os.path.dirname(d)
    names = []
    for _ in range(parts):
        if os.path.basename(d):
            names.insert(0, os.path.basename(d))
        d = os.path.dirname(d)
    return "/".join(names) or run_dir



def load_runs(run_dirs: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[Run]:
    if labels is not None and len(labels) and len(labels) != len(run_dirs):
        raise ReportError(f"{len(labels)} --labels for {len(run_dirs)} runs; give one label per run")
    given = bool(labels)
    labels = list(labels) if labels else [default_label(d) for d in run_dirs]
    if len(set(labels)) != len(labels) and not given:
        longer = [default_label(d, 2) for d in run_dirs]  # e.g. cpu-tiny/plan-fp32-s1234
        labels = longer if len(set(longer)) == len(longer) else labels
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    return [load_run(d, lab) for d, lab in zip(run_dirs, labels)]
