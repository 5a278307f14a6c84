"""SFT (full-parameter post-training) dataset over preprocessed conversations, with optional packing.

Owns: the on-disk pair ``PREFIX_input_ids_document`` + ``PREFIX_loss_mask_document`` (one sequence per
conversation, the mask 1 on assistant tokens, uint8; written by ``preprocess_data.py --sft``), the
packing index, and the sample fields. Does not own: chat templates (chat_templates.py).

Each conversation of n ids contributes ``n - 1`` positions: inputs ``ids[:-1]``, labels ``ids[1:]``,
loss mask ``mask[1:]`` (loss on predicting assistant tokens only). A sample is ``seq_length`` positions:

- unpacked: one conversation, padded;
- packed (``pack=True``): several conversations chosen by best-fit-decreasing on their lengths,
  concatenated, then padded. ``position_ids`` restart at 0 at each conversation and ``segment_ids``
  number them 0, 1, ... (padding is one more segment), so a model that attends within equal segment ids
  (masks.block_causal_mask) computes each conversation exactly as if it were alone.

Fields: ``tokens, labels [s] int64``, ``loss_mask [s] float32``, ``position_ids [s] int64``,
``segment_ids [s] int64`` (always present for SFT). Conversations longer than seq_length + 1 ids are
dropped (counted in ``num_dropped``), or cut with ``truncate=True``; those with no trainable token are
dropped too.
"""
from __future__ import annotations

import bisect
import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import index_cache
from .blended_dataset import BlendedDataset, parse_data_path
from .errors import DataError
from .gpt_dataset import parse_split, split_components
from .indexed_dataset import IndexedDataset, dataset_exists
from .sft_format import INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX

logger = logging.getLogger(__name__)
INDEX_VERSION = 1


def sft_prefixes(prefix: str) -> Tuple[str, str]:
    """``P`` (or ``P_input_ids_document``) -> (``P_input_ids_document``, ``P_loss_mask_document``)."""
    for suf in (INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX):
        if prefix.endswith(suf):
            prefix = prefix[: -len(suf)]
    return prefix + INPUT_IDS_SUFFIX, prefix + LOSS_MASK_SUFFIX


def open_sft_data(prefix: str) -> Tuple[IndexedDataset, IndexedDataset]:
    ids_p, mask_p = sft_prefixes(prefix)
    if not dataset_exists(ids_p) or not dataset_exists(mask_p):
        raise DataError(f"SFT data {prefix!r}: expected {ids_p}.bin/.idx and {mask_p}.bin/.idx; make them with "
                        f"tools/preprocess_data.py --sft --output-prefix {prefix}")
    ids, mask = IndexedDataset(ids_p), IndexedDataset(mask_p)
    if not np.array_equal(ids.sequence_lengths, mask.sequence_lengths):
        raise DataError(f"SFT data {prefix!r}: the loss-mask dataset's sequence lengths differ from the input-ids "
                        f"dataset's; they were not written together; re-run tools/preprocess_data.py --sft")
    return ids, mask


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of item indices, each bin's total length <= capacity: items longest first, each into the bin with
    the least room that still fits it (best-fit decreasing), else a new bin. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: List[Tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    bins: List[List[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            rem -= n
        else:
            b = len(bins)
            bins.append([i])
            rem = capacity - n
        if rem > 0:
            bisect.insort(free, (rem, b))
    return bins


def build_sft_index(lengths: np.ndarray, trainable: np.ndarray, docs: np.ndarray, seq_length: int, pack: bool,
                    truncate: bool, num_samples: Optional[int], seed: int) -> dict:
    positions = np.maximum(lengths[docs].astype(np.int64) - 1, 0)
    if truncate:
        positions = np.minimum(positions, seq_length)
    keep = (positions > 0) & (positions <= seq_length) & trainable
    kept = docs[keep]
    if pack:
        bins = first_fit_decreasing(positions[keep].tolist(), seq_length)
        bins = [sorted(b) for b in bins]
        items = np.array([kept[i] for b in bins for i in b], dtype=np.int64)
        offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    else:
        items = kept.astype(np.int64)
        offsets = np.arange(len(kept) + 1, dtype=np.int64)
    groups = len(offsets) - 1
    if groups == 0:
        return {"items": items, "offsets": offsets, "order": np.zeros(0, np.int64),
                "dropped": np.array([len(docs) - len(kept)])}
    epochs = 1 if num_samples is None else max(1, math.ceil(num_samples / groups))
    rng = np.random.RandomState(seed)
    order = np.concatenate([rng.permutation(groups) for _ in range(epochs)]).astype(np.int64)
    return {"items": items, "offsets": offsets, "order": order, "dropped": np.array([len(docs) - len(kept)])}


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: IndexedDataset, loss_mask: IndexedDataset, seq_length: int,
                 num_samples: Optional[int] = None, seed: int = 1234, pack: bool = False, pad: int = 0,
                 split_range: Optional[Tuple[int, int]] = None, truncate: bool = False, name: str = "train",
                 cache_dir: Optional[str] = None):
        if seq_length < 1:
            raise DataError(f"seq_length {seq_length} must be >= 1")
        if not np.array_equal(input_ids.sequence_lengths, loss_mask.sequence_lengths):
            raise DataError(f"{loss_mask.path_prefix}: its sequence lengths differ from {input_ids.path_prefix}")
        a, b = split_range if split_range is not None else (0, len(input_ids))
        self.ids, self.mask, self.seq_length, self.pad, self.truncate = input_ids, loss_mask, seq_length, pad, truncate
        lengths = input_ids.sequence_lengths
        docs = np.arange(a, b, dtype=np.int64)
        description = {"class": "SFTDataset", "version": INDEX_VERSION, "path_prefix": input_ids.path_prefix,
                       "index_md5": index_cache.fingerprint_index(input_ids), "split_range": [int(a), int(b)],
                       "num_samples": num_samples, "seq_length": seq_length, "seed": seed, "pack": pack,
                       "truncate": truncate, "mask_md5": _mask_md5(loss_mask)}

        def build():
            trainable = np.array([bool(loss_mask[int(d)][1:].any()) for d in docs], dtype=bool)
            return build_sft_index(lengths, trainable, docs, seq_length, pack, truncate, num_samples, seed)

        self.description = description
        arrays = index_cache.load_or_build(cache_dir, f"SFTDataset-{name}", ("items", "offsets", "order", "dropped"),
                                           description, build)
        self.items, self.offsets, self.order = arrays["items"], arrays["offsets"], arrays["order"]
        self.num_dropped = int(arrays["dropped"][0])
        if len(self.order) == 0:
            raise DataError(f"{input_ids.path_prefix}: no conversation of the {name} split fits seq_length "
                            f"{seq_length} with a trainable token ({self.num_dropped} dropped); raise --seq-length "
                            f"or pass truncate")
        if self.num_dropped:
            logger.warning("%s (%s): dropped %d of %d conversations (longer than seq_length + 1 = %d ids, or no "
                           "assistant token)", input_ids.path_prefix, name, self.num_dropped, len(docs),
                           seq_length + 1)

    def __len__(self) -> int:
        return len(self.order)

    def conversations(self, idx: int) -> List[int]:
        """The conversation (sequence) ids packed into sample ``idx``."""
        g = int(self.order[idx])
        return [int(x) for x in self.items[int(self.offsets[g]): int(self.offsets[g + 1])]]

    def __getitem__(self, idx: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad, dtype=np.int64)
        labels = np.full(s, self.pad, dtype=np.int64)
        loss = np.zeros(s, dtype=np.float32)
        pos = np.zeros(s, dtype=np.int64)
        seg = np.zeros(s, dtype=np.int64)
        at = 0
        convs = self.conversations(idx)
        for k, c in enumerate(convs):
            ids = self.ids[c][: s + 1]
            m = self.mask[c][: s + 1]
            n = len(ids) - 1
            tokens[at: at + n] = ids[:-1]
            labels[at: at + n] = ids[1:]
            loss[at: at + n] = m[1:]
            pos[at: at + n] = np.arange(n)
            seg[at: at + n] = k
            at += n
        if at < s:
            pos[at:] = np.arange(s - at)
            seg[at:] = len(convs)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss), "position_ids": torch.from_numpy(pos),
                "segment_ids": torch.from_numpy(seg)}


def _mask_md5(ds: IndexedDataset) -> str:
    import hashlib
    h = hashlib.md5()
    h.update(np.ascontiguousarray(ds.tokens).tobytes())
    return h.hexdigest()


def build_sft_datasets(data_path: Sequence[str], split: str, train_valid_test_num_samples: Sequence[Optional[int]],
                       seq_length: int, seed: int, pack: bool = False, pad: int = 0, truncate: bool = False,
                       cache_dir: Optional[str] = None):
    """(train, valid, test) SFT datasets for ``--data-path`` (SFT prefixes, optionally weighted) and ``--split``."""
    weights, prefixes = parse_data_path(data_path)
    fractions = parse_split(split)
    opened = [open_sft_data(p) for p in prefixes]
    out = []
    for s, name in enumerate(("train", "valid", "test")):
        n = train_valid_test_num_samples[s]
        if fractions[s] == 0 or n == 0:
            out.append(None)
            continue
        comps, empty = split_components([len(ids) for ids, _ in opened], weights, fractions, s, n)
        for i in empty:
            ids = opened[i][0]
            logger.warning("%s: the %s split has no conversations (split %s over %d); it is not used",
                           ids.path_prefix, name, split, len(ids))
        parts, part_weights = [], []
        for i, rng, w, want in comps:
            ids, mask = opened[i]
            cd = cache_dir if cache_dir is not None else os.path.join(
                os.path.dirname(os.path.abspath(ids.path_prefix)), "cache", "SFTDataset_indices")
            parts.append(SFTDataset(ids, mask, seq_length, want, seed, pack, pad, rng, truncate, name, cd))
            part_weights.append(w)
        if not parts:
            out.append(None)
        elif len(opened) == 1:
            out.append(parts[0])
        else:
            size = n if n is not None else sum(len(p) for p in parts)
            out.append(BlendedDataset(parts, part_weights, size, cache_dir=cache_dir, name=f"sft-{name}", seed=seed))
    return tuple(out)
