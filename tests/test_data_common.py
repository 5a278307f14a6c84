"""Shared fixtures for the data-pipeline tests (imported by tests/test_data_*.py; holds no tests itself).

Corpora come from Python's own stdlib sources; tokenizers are trained here in well under a second.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from megatron_ascend.data import tokenizer_training as tt
from megatron_ascend.data.indexed_dataset import IndexedDatasetBuilder

STDLIB = os.path.dirname(os.__file__)


def stdlib_texts(n: int = 30, max_chars: int = 6000):
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:n]
    out = []
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read()[:max_chars])
    return out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def build_indexed(prefix, docs, dtype=np.int32):
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=np.int64))
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_pipeline")


@pytest.fixture(scope="session")
def texts():
    return stdlib_texts()


@pytest.fixture(scope="session")
def sp_model(data_root, texts):
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    return tt.train_sentencepiece(lines, str(data_root / "sp" / "tok"), vocab_size=600)


@pytest.fixture(scope="session")
def hf_dir(data_root, texts):
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    return tt.train_hf_bpe(lines, str(data_root / "hf"), vocab_size=600)
