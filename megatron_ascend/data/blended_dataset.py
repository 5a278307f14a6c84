"""Blending several datasets by weight, and the ``--data-path w1 p1 w2 p2 ...`` parser.

Owns: :class:`BlendedDataset` and its two indices (``dataset_index`` which component each sample comes
from, ``dataset_sample_index`` which sample of it), built with Megatron's greedy schedule — sample i goes
to the component with the largest error ``weight_d * max(i, 1) - count_d`` (first on ties) — and cached
like the GPT indices. Does not own: the components (any map-style datasets).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import index_cache
from .errors import DataError


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[float], List[str]]:
    """``['p']`` -> ([1.0], ['p']); ``['0.7', 'A', '0.3', 'B']`` -> ([0.7, 0.3], ['A', 'B']) (weights normalized)."""
    items = [str(x) for x in (data_path.split() if isinstance(data_path, str) else data_path)]
    if not items:
        raise DataError("--data-path is empty; pass a prefix (e.g. out/corpus_text_document) or 'w1 p1 w2 p2 ...'")
    if len(items) == 1:
        return [1.0], items
    if len(items) % 2:
        raise DataError(f"--data-path {' '.join(items)!r} has {len(items)} items; with several datasets give "
                        f"weight-prefix pairs, e.g. '0.7 A 0.3 B'")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            wf = float(w)
        except ValueError:
            raise DataError(f"--data-path weight {w!r} (before {p!r}) is not a number; use 'w1 p1 w2 p2 ...'")
        if wf < 0:
            raise DataError(f"--data-path weight {wf} for {p!r} is negative; weights must be >= 0")
        weights.append(wf)
        prefixes.append(p)
    total = sum(weights)
    if total <= 0:
        raise DataError("--data-path weights sum to 0; give at least one dataset a positive weight")
    return [w / total for w in weights], prefixes


def build_blending_indices(weights: Sequence[float], size: int) -> dict:
    w = [float(x) for x in weights]
    d_count = len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    counts = [0] * d_count
    rng = range(d_count)
    for i in range(size):
        scale = i if i > 1 else 1
        best, best_err = 0, None
        for d in rng:
            err = w[d] * scale - counts[d]
            if best_err is None or err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, cache_dir: Optional[str] = None,
                 name: str = "train", seed: int = 0):
        if len(datasets) != len(weights) or not datasets:
            raise DataError(f"BlendedDataset needs one weight per dataset (got {len(datasets)} datasets, "
                            f"{len(weights)} weights)")
        if len(datasets) > 32767:
            raise DataError(f"{len(datasets)} datasets is more than a blend can index (32767)")
        total = float(sum(weights))
        if total <= 0 or any(x < 0 for x in weights):
            raise DataError(f"blend weights {list(weights)} must be >= 0 with a positive sum")
        self.datasets = list(datasets)
        self.weights = [x / total for x in weights]
        self.size = int(size)
        description = {"class": "BlendedDataset", "weights": self.weights, "size": self.size, "split": name,
                       "seed": seed,
                       "datasets": [getattr(d, "description", None) or f"{type(d).__name__}:{len(d)}"
                                    for d in datasets]}
        arrays = index_cache.load_or_build(cache_dir, f"BlendedDataset-{name}",
                                           ("dataset_index", "dataset_sample_index"), description,
                                           lambda: build_blending_indices(self.weights, self.size))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for d, ds in enumerate(self.datasets):
            used = int(np.sum(self.dataset_index == d))
            if used > len(ds):
                raise DataError(f"blend component {d} ({type(ds).__name__} of {len(ds)} samples) "
                                f"is asked for {used} samples; build it with more samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
