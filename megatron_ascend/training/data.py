"""Datasets and per-rank micro-batch iterators for the trainer.

Owns: how many samples each split needs (Megatron's rule: train = train_iters x global batch, valid =
(train_iters // eval_interval + 1) x eval_iters x global batch, test = eval_iters x global batch), the choice of
dataset (mock / GPT pretraining / SFT), and resumable iterators: the train iterator starts at
``consumed_samples`` so a restarted run reads exactly the samples an uninterrupted run would have read.
Validation restarts from sample 0 of the validation split at every evaluation (Megatron's
``--eval-interval`` semantics with a fresh valid iterator), so evaluation results are comparable over time.

Every rank builds the same iterator for its data-parallel rank (all pipeline stages and TP ranks read the
same micro-batches; the first stage uses the tokens, the last stage the labels and loss mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

from ..config import DataConfig, TrainingConfig
from ..data.gpt_dataset import MockGPTDataset, build_train_valid_test_datasets
from ..data.sampler import PretrainingSampler, build_data_iterator


@dataclass
class Datasets:
    train: object
    valid: Optional[object]
    test: Optional[object]


def split_num_samples(train: TrainingConfig, global_batch_size: int) -> List[int]:
    evals = (train.train_iters // max(train.eval_interval, 1) + 1) * train.eval_iters if train.eval_iters else 0
    return [train.train_iters * global_batch_size, evals * global_batch_size, train.eval_iters * global_batch_size]


def build_datasets(data: DataConfig, train: TrainingConfig, global_batch_size: int, vocab_size: int,
                   tokenizer=None, sft: bool = False, pack: bool = False) -> Datasets:
    n_train, n_valid, n_test = split_num_samples(train, global_batch_size)
    if data.mock_data:
        # a fixed pool of samples so that "more iterations" never changes the samples already drawn
        return Datasets(MockGPTDataset(max(n_train, 1), train.seq_length, vocab_size, seed=train.seed),
                        MockGPTDataset(max(n_valid, global_batch_size), train.seq_length, vocab_size,
                                       seed=train.seed + 7919) if n_valid else None,
                        None)
    if not data.data_path:
        from ..config import ConfigError
        raise ConfigError("no training data: pass --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    if sft:
        from ..data.sft_dataset import build_sft_datasets
        pad = tokenizer.pad if tokenizer is not None else 0
        tr, va, te = build_sft_datasets(list(data.data_path), data.split, [n_train, n_valid or 0, n_test or 0],
                                        train.seq_length, train.seed, pack=pack, pad=pad,
                                        cache_dir=data.data_cache_path)
        return Datasets(tr, va, te)
    _refuse_empty(data.data_path)
    eod = tokenizer.eod if tokenizer is not None else None
    kw = dict(vocab_size=tokenizer.vocab_size if tokenizer is not None else vocab_size)  # ids the embedding can take
    if eod is not None:
        kw.update(eod=eod, pad=tokenizer.pad, reset_position_ids=data.reset_position_ids,
                  reset_attention_mask=data.reset_attention_mask, eod_mask_loss=data.eod_mask_loss)
    elif data.eod_mask_loss or data.reset_position_ids or data.reset_attention_mask:
        from ..config import ConfigError
        raise ConfigError("--eod-mask-loss / --reset-position-ids / --reset-attention-mask need the eod token: "
                          "give --tokenizer-type and --tokenizer-model")
    tr, va, te = build_train_valid_test_datasets(list(data.data_path), data.split,
                                                 [n_train, n_valid or 0, n_test or 0], train.seq_length,
                                                 train.seed, data.data_cache_path, **kw)
    if tr is None:
        from ..data.errors import DataError
        raise DataError(f"--data-path {' '.join(data.data_path)} gives the training split no documents (--split "
                        f"{data.split}); the dataset is empty or the split gives training weight 0: check the "
                        f"preprocessed files and --split")
    return Datasets(tr, va, te)


def _refuse_empty(data_path) -> None:
    """A dataset without documents is a DataError naming it (before any split warns about it)."""
    from ..data.blended_dataset import parse_data_path
    from ..data.errors import DataError
    from ..data.indexed_dataset import IndexedDataset
    for p in parse_data_path(list(data_path))[1]:
        if len(IndexedDataset(p)) == 0:
            raise DataError(f"--data-path {p} holds no documents ({p}.idx lists none); preprocess a non-empty "
                            f"corpus or drop it from the blend")


def train_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                   global_batch_size: int, num_workers: int = 0) -> Iterator[dict]:
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size,
                                 global_batch_size)
    return build_data_iterator(dataset, sampler, num_workers=num_workers)


def valid_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, global_batch_size: int,
                   ) -> Iterator[dict]:
    sampler = PretrainingSampler(len(dataset), 0, micro_batch_size, dp_rank, dp_size, global_batch_size)
    return build_data_iterator(dataset, sampler)
