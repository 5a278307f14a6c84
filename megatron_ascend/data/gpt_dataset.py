"""The GPT pretraining dataset over an IndexedDataset, train/valid/test splits, and the dataset builder.

Owns: the three indices of :class:`GPTDataset` and how they are cached, the sample fields, ``--split``,
and :func:`build_train_valid_test_datasets` (single or blended ``--data-path``). Does not own: the file
format (indexed_dataset.py), blending (blended_dataset.py), sampling over ranks (sampler.py).

Indices, built once per (data, split, num_samples, seq_length, seed) and cached next to the data
(``<data dir>/cache/GPTDataset_indices``) under an md5 of those inputs:

- ``document_index [epochs * docs] int32``: the split's document ids, one fresh permutation per epoch
  (``numpy.random.RandomState(seed)``); as many epochs as ``num_samples`` needs.
- ``sample_index [n + 1, 2]``: (position in document_index, token offset) where sample i starts. Sample i
  is the ``seq_length + 1`` tokens at positions ``[i*seq_length, (i+1)*seq_length]`` of the stream that
  concatenates the documents in document_index order (crossing document boundaries, as Megatron's
  ``build_sample_idx``); consecutive samples share one token (the label shift), so every token of an epoch
  is an input exactly once. ``n = (epochs * tokens_per_epoch - 1) // seq_length``.
- ``shuffle_index [n]``: a permutation of the samples *within each epoch* (a sample belongs to the
  epoch its first token is in), so epoch e is fully seen before epoch e+1 starts.

One sequence is one document (preprocess_data.py without --split-sentences), as in Megatron's GPTDataset.

Sample fields (all ``[seq_length]``): ``tokens``, ``labels`` (tokens shifted by one), ``loss_mask``
(float; 0 where the input is eod with eod_mask_loss, and on pad labels), ``position_ids`` (reset after
each eod with reset_position_ids) and, only with reset_attention_mask, ``segment_ids`` (int64, +1 after
each eod; a model attends within equal segment ids, see masks.py).
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import index_cache
from .blended_dataset import BlendedDataset, parse_data_path
from .errors import DataError
from .indexed_dataset import IndexedDataset, check_token_ids

logger = logging.getLogger(__name__)
INDEX_VERSION = 1  # bump when the index algorithm changes, so old caches are not reused


def parse_split(split: Union[str, Sequence[float]]) -> List[float]:
    """'969,30,1' (or '969/30/1', or fewer numbers) -> three normalized weights."""
    if isinstance(split, str):
        try:
            parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
        except ValueError:
            raise DataError(f"--split {split!r} is not a list of numbers; use e.g. 969,30,1")
    else:
        parts = [float(x) for x in split]
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {split!r} needs up to three non-negative weights with a positive sum, e.g. 969,30,1")
    parts = parts + [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(num_docs: int, weights: Sequence[float]) -> List[Tuple[int, int]]:
    """Contiguous document ranges for train/valid/test: bounds round(cumsum(weights) * num_docs)."""
    bounds = [0]
    acc = 0.0
    for w in weights:
        acc += w
        bounds.append(min(num_docs, int(round(acc * num_docs))))
    bounds[-1] = num_docs
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


def default_cache_dir(path_prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path_prefix)), "cache", "GPTDataset_indices")


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int]) -> int:
    if num_samples is None:
        return 1
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_indices(lengths: np.ndarray, docs: np.ndarray, num_samples: Optional[int], seq_length: int,
                  seed: int) -> dict:
    """document_index, sample_index and shuffle_index (see the module docstring). Pure numpy, O(n log n)."""
    tokens_per_epoch = int(lengths[docs].sum())
    epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    document_index = np.concatenate([rng.permutation(docs) for _ in range(epochs)]).astype(np.int32)
    n = (epochs * tokens_per_epoch - 1) // seq_length
    doc_lengths = lengths[document_index].astype(np.int64)
    ends = np.cumsum(doc_lengths)
    starts = ends - doc_lengths
    g = np.arange(n + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, g, side="right")
    off = g - starts[pos]
    idx_dtype = np.int32 if max(len(document_index), int(lengths.max(initial=0))) < 2 ** 31 - 1 else np.int64
    sample_index = np.stack([pos, off], axis=1).astype(idx_dtype)
    # shuffle within epochs: the epoch of a sample is the epoch of its first token
    epoch_of = (g[:-1] // tokens_per_epoch) if n else np.zeros(0, np.int64)
    cuts = np.searchsorted(epoch_of, np.arange(1, epochs + 1), side="left")
    shuf_dtype = np.uint32 if n < 2 ** 32 - 1 else np.int64
    shuffle_index = np.empty(n, dtype=shuf_dtype)
    lo = 0
    for hi in cuts:
        shuffle_index[lo:hi] = lo + rng.permutation(hi - lo)
        lo = hi
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM samples over documents ``split_range = (first, last)`` of ``indexed``."""

    def __init__(self, indexed: IndexedDataset, split_range: Tuple[int, int], num_samples: Optional[int],
                 seq_length: int, seed: int, cache_dir: Optional[str] = None, *, name: str = "train",
                 eod: Optional[int] = None, pad: Optional[int] = None, eod_mask_loss: bool = False,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False, use_cache: bool = True):
        if seq_length < 1:
            raise DataError(f"seq_length {seq_length} must be >= 1")
        a, b = int(split_range[0]), int(split_range[1])
        if not 0 <= a <= b <= len(indexed):
            raise DataError(f"split range {split_range} is outside the {len(indexed)} documents of "
                            f"{indexed.path_prefix}")
        if (eod_mask_loss or reset_position_ids or reset_attention_mask) and eod is None:
            raise DataError("eod_mask_loss / reset_position_ids / reset_attention_mask need the eod token id")
        self.indexed, self.split_range, self.seq_length, self.seed, self.name = indexed, (a, b), seq_length, seed, name
        self.eod, self.pad = eod, pad
        self.eod_mask_loss, self.reset_position_ids, self.reset_attention_mask = (
            eod_mask_loss, reset_position_ids, reset_attention_mask)
        lengths = indexed.sequence_lengths
        docs = np.arange(a, b, dtype=np.int64)
        tokens = int(lengths[a:b].sum())
        if tokens < seq_length + 1:
            raise DataError(f"the {name} split of {indexed.path_prefix} (documents [{a}, {b})) has {tokens} tokens, "
                            f"fewer than one sample of seq_length + 1 = {seq_length + 1}; give this split more "
                            f"weight in --split, add data, or lower --seq-length")
        if cache_dir is None and use_cache:
            cache_dir = default_cache_dir(indexed.path_prefix)
        description = {"class": "GPTDataset", "version": INDEX_VERSION, "path_prefix": indexed.path_prefix,
                       "index_md5": index_cache.fingerprint_index(indexed), "split_range": [a, b],
                       "num_samples": num_samples, "seq_length": seq_length, "seed": seed, "split": name}
        self.description = description
        arrays = index_cache.load_or_build(
            cache_dir if use_cache else None, f"GPTDataset-{name}",
            ("document_index", "sample_index", "shuffle_index"), description,
            lambda: build_indices(lengths, docs, num_samples, seq_length, seed))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.tokens_per_epoch = tokens
        self.num_epochs = len(self.document_index) // max(1, b - a)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample ``idx`` (after the shuffle), as int64."""
        i = int(self.shuffle_index[idx])
        d0, o0 = (int(x) for x in self.sample_index[i])
        d1, o1 = (int(x) for x in self.sample_index[i + 1])
        docs = self.document_index
        if d0 == d1:
            return self.indexed.get(int(docs[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self.indexed.get(int(docs[d0]), o0)]
        parts += [self.indexed[int(docs[d])] for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(docs[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return causal_lm_sample(self.sample_tokens(idx), self.eod, self.pad, self.eod_mask_loss,
                                self.reset_position_ids, self.reset_attention_mask)


def causal_lm_sample(sample: np.ndarray, eod: Optional[int], pad: Optional[int], eod_mask_loss: bool,
                     reset_position_ids: bool, reset_attention_mask: bool) -> dict:
    tokens = torch.from_numpy(sample[:-1].copy())
    labels = torch.from_numpy(sample[1:].copy())
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    if pad is not None and pad != eod:
        loss_mask[labels == pad] = 0.0
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if reset_position_ids or reset_attention_mask:
        is_eod = (tokens == eod).long()
        seg = torch.cumsum(is_eod, 0) - is_eod  # the eod token belongs to the document it ends
    if reset_position_ids:
        starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.long), seg[1:] - seg[:-1]])).flatten()
        out["position_ids"] = torch.arange(s) - starts[seg]  # seg is 0-based and dense
    else:
        out["position_ids"] = torch.arange(s)
    if reset_attention_mask:
        out["segment_ids"] = seg
    return out


class MockGPTDataset(torch.utils.data.Dataset):
    """Deterministic random tokens (sample i from RandomState(seed + i)); for --mock-data runs and tests."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.RandomState((self.seed + idx) % (2 ** 32))
        sample = rng.randint(0, self.vocab_size, size=self.seq_length + 1).astype(np.int64)
        return causal_lm_sample(sample, None, None, False, False, False)


def checked_token_ids(ds: IndexedDataset, vocab_size: int, cache_dir: Optional[str] = None) -> None:
    """check_token_ids, with the scan's result (min / max id) cached next to the data so a multi-TB corpus
    is scanned once, not at every start. Raises DataError naming the first bad sequence."""
    st = os.stat(ds.path_prefix + ".bin")
    description = {"class": "TokenIdRange", "path_prefix": ds.path_prefix,
                   "index_md5": index_cache.fingerprint_index(ds), "bin_size": st.st_size, "bin_mtime_ns": st.st_mtime_ns}

    def scan():
        flat = ds.tokens
        lo = hi = 0
        for s in range(0, len(flat), 1 << 24):
            block = flat[s: s + (1 << 24)]
            lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
        return {"range": np.array([lo, hi], dtype=np.int64)}

    got = index_cache.load_or_build(cache_dir or default_cache_dir(ds.path_prefix), "TokenIdRange", ("range",),
                                    description, scan)["range"]
    if got[0] < 0 or got[1] >= vocab_size:
        check_token_ids(ds, vocab_size)  # the full scan names the sequence


def split_components(lengths: Sequence[int], weights: Sequence[float], fractions, s: int, n: Optional[int]):
    """The blend components of split ``s``: ([(index, document range, weight, samples to build)], indices of
    the components whose range is empty). The weights are renormalised over the components kept, and each is
    built with ceil(weight x n x 1.005) samples as Megatron does (n itself for a single dataset), so the
    blend can always draw its n samples."""
    ranges = [split_ranges(length, fractions)[s] for length in lengths]
    keep = [i for i, r in enumerate(ranges) if r[0] != r[1]]
    total = sum(weights[i] for i in keep)
    comps = []
    for i in keep:
        w = weights[i] / total
        want = n if len(lengths) == 1 or n is None else int(math.ceil(w * n * 1.005))
        comps.append((i, ranges[i], w, want))
    return comps, [i for i in range(len(lengths)) if i not in keep]


def build_train_valid_test_datasets(data_path: Sequence[str], split: str,
                                    train_valid_test_num_samples: Sequence[Optional[int]], seq_length: int,
                                    seed: int, cache_dir: Optional[str] = None, *, vocab_size: Optional[int] = None,
                                    **dataset_kwargs):
    """(train, valid, test) datasets for ``--data-path`` (``[p]`` or ``[w1, p1, w2, p2, ...]``) and ``--split``.

    A split with weight 0, 0 requested samples, or no document at all (a tiny corpus) is None (the last
    with a warning); a split with documents but fewer tokens than one sample is an error. With several
    prefixes each split is a BlendedDataset whose components are sized ceil(weight x n x 1.005), as Megatron does
    (weights renormalised over the components that have documents in that split: ``split_components``). ``vocab_size``
    (the tokenizer's, unpadded) turns on the token-id range check of every .bin.
    """
    weights, prefixes = parse_data_path(data_path)
    fractions = parse_split(split)
    names = ("train", "valid", "test")
    if len(train_valid_test_num_samples) != 3:
        raise DataError("train_valid_test_num_samples must have three entries (train, valid, test)")
    indexed = []
    for p in prefixes:
        ds = IndexedDataset(p)
        if vocab_size is not None:
            checked_token_ids(ds, vocab_size, cache_dir)
        indexed.append(ds)
    out = []
    for s, name in enumerate(names):
        n = train_valid_test_num_samples[s]
        if fractions[s] == 0 or n == 0:
            out.append(None)
            continue
        comps, empty = split_components([len(ds) for ds in indexed], weights, fractions, s, n)
        for i in empty:  # the split got no document of this dataset (a tiny corpus): leave it out
            logger.warning("%s: the %s split has no documents (split %s over %d documents); it is not used",
                           indexed[i].path_prefix, name, split, len(indexed[i]))
        parts = [GPTDataset(indexed[i], rng, want, seq_length, seed, cache_dir, name=name, **dataset_kwargs)
                 for i, rng, _, want in comps]
        part_weights = [w for _, _, w, _ in comps]
        if not parts:
            out.append(None)
        elif len(indexed) == 1:
            out.append(parts[0])
        else:
            size = n if n is not None else sum(len(p) for p in parts)
            blend_cache = cache_dir if cache_dir is not None else default_cache_dir(prefixes[0])
            out.append(BlendedDataset(parts, part_weights, size, cache_dir=blend_cache, name=name, seed=seed))
    return tuple(out)
