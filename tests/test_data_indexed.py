"""Tokenizers, the .bin/.idx format (checked against the Megatron spec, not our writer), preprocessing and
every validation message."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_ascend.config import padded_vocab_size
from megatron_ascend.data import preprocess
from megatron_ascend.data.errors import DataError
from megatron_ascend.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, check_token_ids
from megatron_ascend.data.tokenizer import build_tokenizer

from test_data_common import build_indexed, data_root, hf_dir, sp_model, texts, write_jsonl  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = [("SentencePieceTokenizer", "sp_model"), ("HuggingFaceTokenizer", "hf_dir")]


def _tok(request, kind, fixture, **kw):
    return build_tokenizer(kind, request.getfixturevalue(fixture), **kw)


def _run(argv):
    return preprocess.main(argv + ["--no-progress"])


# -- tokenizers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fixture", TOKENIZERS)
def test_tokenizer_interface(request, kind, fixture):
    tok = _tok(request, kind, fixture, make_vocab_size_divisible_by=128, tp=4)
    assert tok.vocab_size <= 600 + 8
    assert tok.padded_vocab_size == padded_vocab_size(tok.vocab_size, 128, 4) == 1024
    ids = tok.tokenize("def main():\n    return 42\n")
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == "def main():\n    return 42\n"
    assert tok.eod not in ids and tok.bos not in ids  # tokenize adds no special tokens
    assert len({tok.eod, tok.bos}) == 2 and tok.pad is not None
    assert tok.token_to_id("<｜User｜>") is not None  # chat tags are single tokens


def test_tokenizer_errors(tmp_path, sp_model):
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(DataError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(DataError, match="unknown"):
        build_tokenizer("GPT2BPETokenizer", sp_model)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


# -- the format, from the spec --------------------------------------------------------------------
def _spec_parse(idx_bytes):
    """Parse an .idx exactly as Megatron's format specifies (independent of our reader)."""
    assert idx_bytes[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx_bytes, 9)
    code = idx_bytes[17]
    seq_count, doc_count = struct.unpack_from("<QQ", idx_bytes, 18)
    off = 34
    lengths = np.frombuffer(idx_bytes, "<i4", seq_count, off)
    off += 4 * seq_count
    pointers = np.frombuffer(idx_bytes, "<i8", seq_count, off)
    off += 8 * seq_count
    docs = np.frombuffer(idx_bytes, "<i8", doc_count, off)
    off += 8 * doc_count
    return version, code, lengths, pointers, docs, off


@pytest.mark.parametrize("kind,fixture", TOKENIZERS)
def test_preprocess_round_trip_and_megatron_bytes(request, tmp_path, texts, kind, fixture):
    model = request.getfixturevalue(fixture)
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    records.insert(3, {"text": ""})  # an empty document: skipped and reported
    src = write_jsonl(tmp_path / "corpus.jsonl", records)
    prefix = str(tmp_path / "out" / "corpus")
    assert _run(["--input", src, "--output-prefix", prefix, "--tokenizer-type", kind, "--tokenizer-model", model,
                 "--json-keys", "text", "--append-eod", "--workers", "2", "--chunk-bytes", "20000"]) == 0
    tok = build_tokenizer(kind, model)
    expected = [tok.tokenize(t) + [tok.eod] for t in texts]

    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == ds.num_documents == len(texts)
    for i, e in enumerate(expected):
        assert ds[i].tolist() == e, f"document {i}"

    raw = open(prefix + "_text_document.idx", "rb").read()
    version, code, lengths, pointers, docs, end = _spec_parse(raw)
    assert version == 1 and code == 8  # uint16: vocab < 65500
    assert end == len(raw)
    assert lengths.tolist() == [len(e) for e in expected]
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).tolist()
    assert docs.tolist() == list(range(len(texts) + 1))
    binary = open(prefix + "_text_document.bin", "rb").read()
    assert binary == b"".join(np.asarray(e, "<u2").tobytes() for e in expected)


def test_reads_megatron_written_file_with_sentences(tmp_path):
    """A file laid out by hand from the spec (int32, documents of several sentences) reads back."""
    seqs = [[5, 6, 7], [8], [9, 10], [], [11, 12, 13, 14]]
    doc_idx = [0, 2, 3, 5]  # doc0 = seqs 0-1, doc1 = seq 2, doc2 = seqs 3-4
    lengths = np.array([len(s) for s in seqs], "<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<i8") * 4
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
        f.write(struct.pack("<QQ", len(seqs), len(doc_idx)))
        f.write(lengths.tobytes() + pointers.tobytes() + np.array(doc_idx, "<i8").tobytes())
    with open(tmp_path / "m.bin", "wb") as f:
        f.write(b"".join(np.array(s, "<i4").tobytes() for s in seqs))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32 and len(ds) == 5 and ds.num_documents == 3
    assert [ds[i].tolist() for i in range(5)] == seqs
    assert ds.document(0).tolist() == [5, 6, 7, 8] and ds.document(2).tolist() == [11, 12, 13, 14]
    assert ds.get(4, 1, 2).tolist() == [12, 13]
    # and our builder writes the identical bytes for the same content
    b = IndexedDatasetBuilder(str(tmp_path / "o.bin"), np.int32)
    b.add_document([5, 6, 7, 8], [3, 1])
    b.add_document([9, 10])
    b.add_document([11, 12, 13, 14], [0, 4])
    b.finalize(str(tmp_path / "o.idx"))
    assert open(tmp_path / "o.idx", "rb").read() == open(tmp_path / "m.idx", "rb").read()
    assert open(tmp_path / "o.bin", "rb").read() == open(tmp_path / "m.bin", "rb").read()


def test_builder_is_atomic_and_merges(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "a.bin"), np.uint16)
    b.add_document([1, 2, 3])
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.idx").exists()
    b.abort()
    assert os.listdir(tmp_path) == []
    build_indexed(tmp_path / "a", [[1, 2], [3]], np.uint16)
    build_indexed(tmp_path / "b", [[4], [], [5, 6]], np.uint16)
    m = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    m.add_index(str(tmp_path / "a"))
    m.add_index(str(tmp_path / "b"))
    m.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4], [], [5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DataError, match="does not fit uint16"):
        IndexedDatasetBuilder(str(tmp_path / "w.bin"), np.uint16).add_document([70000])


# -- validation -----------------------------------------------------------------------------------
@pytest.fixture
def small_ds(tmp_path):
    return build_indexed(tmp_path / "s", [[1, 2, 3], [4, 5], [6]], np.uint16)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_and_corrupted_files(small_ds):
    idx, binf = small_ds + ".idx", small_ds + ".bin"
    good_idx, good_bin = open(idx, "rb").read(), open(binf, "rb").read()

    def restore():
        open(idx, "wb").write(good_idx)
        open(binf, "wb").write(good_bin)

    open(idx, "wb").write(good_idx[:-5])
    with pytest.raises(DataError, match=r"s\.idx.*truncated.*preprocess_data"):
        IndexedDataset(small_ds)
    open(idx, "wb").write(good_idx[:20])
    with pytest.raises(DataError, match="shorter than the 34-byte header"):
        IndexedDataset(small_ds)
    restore()
    open(binf, "wb").write(good_bin[:-2])
    with pytest.raises(DataError, match=r"s\.bin.*truncated"):
        IndexedDataset(small_ds)
    restore()
    _patch(idx, 0, b"XXIDIDX")
    with pytest.raises(DataError, match="not the MMIDIDX magic"):
        IndexedDataset(small_ds)
    restore()
    _patch(idx, 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match="version 2 is not supported"):
        IndexedDataset(small_ds)
    restore()
    _patch(idx, 17, bytes([99]))
    with pytest.raises(DataError, match="dtype code 99 is unknown"):
        IndexedDataset(small_ds)
    restore()
    _patch(idx, 17, bytes([4]))  # int32 code on a uint16 file
    with pytest.raises(DataError, match="pointers imply 2-byte tokens.*int32.*wrong dtype code"):
        IndexedDataset(small_ds)
    restore()
    _patch(idx, 34, struct.pack("<i", 7))  # first length corrupted
    with pytest.raises(DataError, match="corrupted"):
        IndexedDataset(small_ds)
    restore()
    os.remove(binf)
    with pytest.raises(DataError, match=r"s\.bin' does not exist"):
        IndexedDataset(small_ds)


def test_token_ids_at_or_above_vocab(tmp_path):
    prefix = build_indexed(tmp_path / "v", [[1, 2], [3, 499], [500, 7]], np.uint16)
    ds = IndexedDataset(prefix)
    check_token_ids(ds, 501)
    with pytest.raises(DataError, match=r"token id 500 in sequence 2 is outside the vocabulary \[0, 500\)"):
        check_token_ids(ds, 500)


def _bad_corpus(tmp_path, texts):
    lines = [json.dumps({"text": texts[0]}), json.dumps({"text": texts[1]}), '{"text": "unterminated',
             json.dumps({"body": "no text key"}), "", json.dumps({"text": texts[2]})]
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_malformed_lines_fatal_or_skipped(tmp_path, texts, sp_model, capsys):
    src = _bad_corpus(tmp_path, texts)
    args = ["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sp_model, "--append-eod"]
    assert _run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.jsonl:3: not valid JSON" in err[0]
    assert "--on-bad-line skip" in err[0]
    assert not any(p.startswith("o_") for p in os.listdir(tmp_path))  # nothing half-written left behind
    assert _run(args + ["--on-bad-line", "skip", "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert "bad.jsonl:3: not valid JSON" in out.err and "bad.jsonl:4: missing key 'text'" in out.err
    assert "skipped 2 bad lines" in out.out
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod] for t in texts[:3]]


def test_cli_one_line_error_no_traceback(tmp_path, sp_model):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input",
                        str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --input {str(tmp_path / 'missing.jsonl')!r} matches no file; "
                                             f"pass JSONL / JSON / parquet files, a glob or a directory"]


def test_train_tokenizer_tool(tmp_path, texts):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[:10]])
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    assert train_tokenizer.main(["--input", src, "--model-prefix", str(tmp_path / "t"), "--vocab-size", "400",
                                 "--num-threads", "1"]) == 0
    tok = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "t.model"))
    assert tok.vocab_size <= 400 and (tok.bos, tok.eod, tok.pad) == (1, 2, 3)
    assert train_tokenizer.main(["--input", src, "--library", "huggingface", "--output-dir", str(tmp_path / "h"),
                                 "--vocab-size", "400"]) == 0
    hf = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "h"))
    assert hf.chat_template and hf.detokenize(hf.tokenize("x = 1")) == "x = 1"
    assert train_tokenizer.main(["--input", str(tmp_path / "none.txt"), "--model-prefix", str(tmp_path / "z")]) == 1


def test_two_keys_bos_and_gpt_dataset_on_output(tmp_path, texts, sp_model, capsys):
    from megatron_ascend.data.gpt_dataset import build_train_valid_test_datasets
    recs = [{"text": t, "title": t[:30]} for t in texts[:12]]
    recs.insert(2, {"text": texts[0], "title": "  "})  # an empty title: the whole record is skipped
    src = write_jsonl(tmp_path / "k.jsonl", recs)
    prefix = str(tmp_path / "k")
    assert _run(["--input", str(tmp_path / "*.jsonl"), "--output-prefix", prefix, "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--json-keys", "text", "title",
                 "--append-eod", "--prepend-bos"]) == 0
    assert f"skipped 1 empty documents (first at {src}:3)" in capsys.readouterr().out
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    kept = [r for r in recs if r["title"].strip()]
    for key in ("text", "title"):
        ds = IndexedDataset(f"{prefix}_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [[tok.bos] + tok.tokenize(r[key]) + [tok.eod]
                                                            for r in kept]
    train, valid, _ = build_train_valid_test_datasets([prefix + "_text_document"], "10,2", [30, 3, 0], 64, 0,
                                                      cache_dir=str(tmp_path / "c"), vocab_size=tok.vocab_size,
                                                      eod=tok.eod, eod_mask_loss=True)
    item = train[0]
    assert item["tokens"].shape == (64,) and int(item["tokens"].max()) < tok.vocab_size
    assert float(item["loss_mask"].sum()) == 64 - int((item["tokens"] == tok.eod).sum())


def test_cross_read_with_megatron_core(tmp_path):
    """Optional: when megatron-core is importable, each side reads the other's files (and the bytes match)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch
    docs = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    ours = build_indexed(tmp_path / "ours", docs, np.uint16)
    theirs_read = mc.IndexedDataset(ours)
    assert len(theirs_read) == 3 and [theirs_read[i].tolist() for i in range(3)] == docs
    assert theirs_read.document_indices.tolist() == [0, 1, 2, 3]
    b = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(tmp_path / "theirs.idx"))
    ds = IndexedDataset(str(tmp_path / "theirs"))
    assert [ds[i].tolist() for i in range(3)] == docs
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "theirs") + ext, "rb").read() == open(ours + ext, "rb").read()
