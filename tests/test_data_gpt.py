"""GPT sample/document/shuffle indices, their cache, splits, blending, the DP sampler and resume."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_ascend.data import gpt_dataset as gd
from megatron_ascend.data.blended_dataset import BlendedDataset, parse_data_path
from megatron_ascend.data.errors import DataError
from megatron_ascend.data.gpt_dataset import GPTDataset, MockGPTDataset, build_train_valid_test_datasets
from megatron_ascend.data.indexed_dataset import IndexedDataset
from megatron_ascend.data.masks import block_causal_mask, cu_seqlens
from megatron_ascend.data.sampler import PretrainingSampler, build_data_iterator

from test_data_common import build_indexed

EOD = 0


def _docs(n_docs=23, seed=0, base=1):
    """Documents whose tokens are all distinct (token value = a global position + base), some empty."""
    rng = np.random.RandomState(seed)
    lens = rng.randint(0, 40, size=n_docs)
    lens[[3, 11]] = 0
    docs, nxt = [], base
    for n in lens:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


@pytest.fixture
def corpus(tmp_path):
    return build_indexed(tmp_path / "c_text_document", _docs(), np.int32)


def test_every_token_once_per_epoch(corpus, tmp_path):
    ds_idx = IndexedDataset(corpus)
    seq = 16
    n_docs = len(ds_idx)
    tokens_per_epoch = int(ds_idx.sequence_lengths.sum())
    ds = GPTDataset(ds_idx, (0, n_docs), 3 * tokens_per_epoch // seq, seq, seed=7, cache_dir=str(tmp_path / "cache"))
    epochs = ds.num_epochs
    assert epochs >= 3 and len(ds) == (epochs * tokens_per_epoch - 1) // seq
    # each epoch of the document index is a permutation of the split's documents
    for e in range(epochs):
        assert sorted(ds.document_index[e * n_docs:(e + 1) * n_docs].tolist()) == list(range(n_docs))
    stream = np.concatenate([ds_idx[int(d)] for d in ds.document_index])
    inverse = np.argsort(ds.shuffle_index)
    counts = np.zeros(tokens_per_epoch + 1, dtype=np.int64)
    for i in range(len(ds)):  # sample i (before the shuffle) is stream[i*seq : i*seq + seq + 1]
        item = ds[int(inverse[i])]
        full = np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]])
        assert full.tolist() == stream[i * seq: i * seq + seq + 1].tolist()
        assert item["labels"].tolist() == full[1:].tolist()
        assert item["position_ids"].tolist() == list(range(seq)) and item["loss_mask"].sum() == seq
        np.add.at(counts, item["tokens"].numpy(), 1)
    tail = set(stream[len(ds) * seq:].tolist())  # the last tokens of the final epoch are never an input
    assert len(tail) <= seq
    for t in range(1, tokens_per_epoch + 1):
        assert counts[t] == (epochs - 1 if t in tail else epochs), t
    # the shuffle stays inside epochs: the first samples read all start in epoch 0
    n0 = int(np.sum(np.arange(len(ds)) * seq < tokens_per_epoch))
    assert sorted(ds.shuffle_index[:n0].tolist()) == list(range(n0))


def test_index_cache_reused_and_rebuilt(corpus, tmp_path, monkeypatch):
    ds_idx = IndexedDataset(corpus)
    cache = tmp_path / "cache"
    a = GPTDataset(ds_idx, (0, len(ds_idx)), 50, 8, seed=1, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and any(f.endswith("description.json") for f in files)
    real = gd.build_indices
    monkeypatch.setattr(gd, "build_indices", lambda *a, **k: pytest.fail("cache not reused"))
    b = GPTDataset(ds_idx, (0, len(ds_idx)), 50, 8, seed=1, cache_dir=str(cache))
    assert np.array_equal(a.shuffle_index, b.shuffle_index) and b[5]["tokens"].tolist() == a[5]["tokens"].tolist()
    monkeypatch.setattr(gd, "build_indices", real)
    GPTDataset(ds_idx, (0, len(ds_idx)), 50, 8, seed=2, cache_dir=str(cache))  # new seed: new files
    assert len(os.listdir(cache)) == 8
    build_indexed(corpus, _docs(seed=5))  # the data changed under the same name: rebuilt
    c = GPTDataset(IndexedDataset(corpus), (0, len(ds_idx)), 50, 8, seed=1, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 12
    assert not np.array_equal(c.sample_index, a.sample_index)
    # default: cached next to the data
    GPTDataset(ds_idx, (0, len(ds_idx)), 10, 8, seed=1)
    assert os.listdir(os.path.join(os.path.dirname(corpus), "cache", "GPTDataset_indices"))


def test_split_and_builder(corpus, tmp_path):
    assert gd.parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert gd.split_ranges(1000, gd.parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    assert gd.split_ranges(23, gd.parse_split("8,2")) == [(0, 18), (18, 23), (23, 23)]
    with pytest.raises(DataError, match="--split 'a,b'"):
        gd.parse_split("a,b")
    train, valid, test = build_train_valid_test_datasets([corpus], "8,2", [40, 5, 5], 8, seed=3,
                                                         cache_dir=str(tmp_path / "c"), vocab_size=10 ** 6)
    assert test is None and len(train) >= 40 and len(valid) >= 5
    assert set(train.document_index.tolist()) == set(range(0, 18))
    assert set(valid.document_index.tolist()) == set(range(18, 23))
    with pytest.raises(DataError, match="outside the vocabulary"):
        build_train_valid_test_datasets([corpus], "8,2", [40, 5, 5], 8, seed=3, vocab_size=100)
    tr, va, te = build_train_valid_test_datasets([corpus], "98,1,1", [40, 5, 5], 8, seed=3,
                                                 cache_dir=str(tmp_path / "c"))
    assert va is None and te is None  # no documents left for them: absent (with a warning), not an error
    with pytest.raises(DataError, match=r"the valid split .*\(documents \[20, 22\)\) has \d+ tokens, fewer than one"):
        build_train_valid_test_datasets([corpus], "20,2,1", [40, 5, 5], 64, seed=3, cache_dir=str(tmp_path / "c"))


def test_blend_component_without_documents_in_a_split_is_dropped_and_the_rest_resized(tmp_path):
    """A blend component whose split got no document is left out; the others are sized with the weights
    renormalised over what remains (else the remaining component is too small for the blend)."""
    a = build_indexed(tmp_path / "a", _docs(100, seed=1, base=1), np.int32)
    b = build_indexed(tmp_path / "b", [list(range(100000 + 40 * i, 100040 + 40 * i)) for i in range(3)],
                      np.int32)  # 3 documents: its valid split is empty
    _, valid, _ = build_train_valid_test_datasets(["0.5", a, "0.5", b], "90,10,0", [40, 40, 0], 8, seed=0,
                                                  cache_dir=str(tmp_path / "c"))
    assert len(valid) == 40
    assert all((valid[i]["tokens"] < 100000).all() for i in range(len(valid)))


def test_blended_weights(tmp_path):
    a = build_indexed(tmp_path / "a", _docs(30, seed=1, base=1), np.int32)
    b = build_indexed(tmp_path / "b", _docs(30, seed=2, base=100000), np.int32)
    assert parse_data_path(["0.7", a, "0.3", b]) == ([0.7, 0.3], [a, b])
    assert parse_data_path(["7", a, "3", b])[0] == pytest.approx([0.7, 0.3])
    for bad, msg in ((["0.7", a, b], "weight-prefix pairs"), (["x", a, "1", b], "'x'"), ([], "empty")):
        with pytest.raises(DataError, match=msg):
            parse_data_path(bad)
    n = 200
    train, _, _ = build_train_valid_test_datasets(["0.7", a, "0.3", b], "1", [n, 0, 0], 8, seed=0,
                                                  cache_dir=str(tmp_path / "c"))
    assert isinstance(train, BlendedDataset) and len(train) == n
    from_a = (train.dataset_index == 0).astype(int)
    for i in range(1, n + 1):  # the greedy schedule keeps every prefix within one sample of the weights
        assert abs(from_a[:i].sum() - 0.7 * i) <= 1.0
    assert from_a.sum() == 140
    for i in (0, 1, 57, 199):
        src = int(train.dataset_index[i])
        assert (train[i]["tokens"] >= 100000).all() == (src == 1)
    assert len(train.datasets[0]) >= int(np.ceil(0.7 * n * 1.005))


def _fake_stream(sampler):
    return [idx for mb in sampler for idx in mb]


def test_sampler_slices_and_exact_resume():
    total, mbs, dp, gbs = 203, 2, 3, 12
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp, gbs)) for r in range(dp)]
    steps = total // gbs
    assert all(len(p) == steps * gbs // (mbs * dp) for p in per_rank)
    # each group of mbs*dp consecutive samples is split into contiguous rank slices
    for k in range(len(per_rank[0])):
        group = [i for r in range(dp) for i in per_rank[r][k]]
        assert group == list(range(k * mbs * dp, (k + 1) * mbs * dp))
    for it in range(steps):
        consumed = it * gbs
        for r in range(dp):
            resumed = list(PretrainingSampler(total, consumed, mbs, r, dp, gbs))
            assert resumed == per_rank[r][consumed // (mbs * dp):]
    assert len(PretrainingSampler(total, 0, mbs, 0, dp, gbs)) == len(per_rank[0])
    with pytest.raises(DataError, match="global-batch-size 10 is not divisible"):
        PretrainingSampler(total, 0, mbs, 0, dp, 10)
    with pytest.raises(DataError, match="multiple of"):
        PretrainingSampler(total, 5, mbs, 0, dp, gbs)
    with pytest.raises(DataError, match="used all its data"):
        PretrainingSampler(total, 204, mbs, 0, dp, gbs)


def test_data_iterator_resume_gives_same_batches(corpus, tmp_path):
    ds = GPTDataset(IndexedDataset(corpus), (0, 23), 96, 8, seed=4, cache_dir=str(tmp_path / "c"))
    mbs, dp, gbs = 2, 2, 8
    full = [list(build_data_iterator(ds, PretrainingSampler(len(ds), 0, mbs, r, dp, gbs))) for r in range(dp)]
    b = full[0][0]
    assert b["tokens"].shape == (mbs, 8) and b["tokens"].dtype == torch.long
    assert b["loss_mask"].dtype == torch.float32 and set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    consumed = 3 * gbs
    for r in range(dp):
        it = build_data_iterator(ds, PretrainingSampler(len(ds), consumed, mbs, r, dp, gbs), num_workers=1)
        rest = list(it)
        want = full[r][consumed // (mbs * dp):]
        assert len(rest) == len(want)
        for x, y in zip(rest, want):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_reset_position_ids_attention_mask_and_eod_loss(tmp_path):
    prefix = build_indexed(tmp_path / "e", [[5, 6, EOD], [7, EOD], [8, 9, 10, 11, EOD]], np.int32)
    ds = GPTDataset(IndexedDataset(prefix), (0, 3), None, 9, seed=0, use_cache=False, eod=EOD,
                    eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    order = np.argsort(ds.shuffle_index)
    item = ds[int(order[0])]
    toks = item["tokens"].tolist()
    seg, pos = item["segment_ids"].tolist(), item["position_ids"].tolist()
    expect_seg, expect_pos, s, p = [], [], 0, 0
    for t in toks:
        expect_seg.append(s)
        expect_pos.append(p)
        p += 1
        if t == EOD:
            s, p = s + 1, 0
    assert seg == expect_seg and pos == expect_pos
    assert item["loss_mask"].tolist() == [0.0 if t == EOD else 1.0 for t in toks]
    m = block_causal_mask(item["segment_ids"])[0, 0]
    for i in range(len(toks)):
        for j in range(len(toks)):
            assert bool(m[i, j]) == (j <= i and seg[i] == seg[j])
    lens = np.diff(cu_seqlens(item["segment_ids"]).numpy())
    assert lens.tolist() == [expect_seg.count(k) for k in sorted(set(expect_seg))]


def test_mock_dataset_is_deterministic():
    a, b = MockGPTDataset(10, 16, 50, seed=3), MockGPTDataset(10, 16, 50, seed=3)
    assert torch.equal(a[4]["tokens"], b[4]["tokens"]) and a[4]["tokens"].max() < 50
    assert torch.equal(a[4]["labels"][:-1], a[4]["tokens"][1:])


def _dist_cache_body(prefix, cache_root, shared):
    import torch.distributed as dist
    rank = dist.get_rank()
    calls = []
    real = gd.build_indices

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    gd.build_indices = counting
    try:
        cache = os.path.join(cache_root, "shared" if shared else f"rank{rank}")
        ds = GPTDataset(IndexedDataset(prefix), (0, 23), 40, 8, seed=9, cache_dir=cache)
        return len(calls), ds.shuffle_index.tolist(), ds[3]["tokens"].tolist()
    finally:
        gd.build_indices = real


@pytest.mark.parametrize("shared", [True, False])
def test_index_build_on_rank0_then_others_load(corpus, tmp_path, shared):
    """Rank 0 builds, the others wait and load; without a shared filesystem each rank builds the same."""
    from harness import run_distributed
    res = run_distributed(2, _dist_cache_body, corpus, str(tmp_path / "cache"), shared, timeout=120)
    assert res[0][0] == 1 and res[1][0] == (0 if shared else 1)
    assert res[0][1:] == res[1][1:]
