"""tools/preprocess_data.py with MindSpeed-LLM's command lines: parquet input (HuggingFace datasets' format)
gives the same .bin/.idx as the same records in JSONL; GeneralPretrainHandler / AlpacaStyleInstructionHandler /
SharegptStyleInstructionHandler, --map-keys, --prompt-type deepseek2 / deepseek3, --log-interval,
--overwrite-cache (accepted) and --enable-thinking (refused)."""
import json
import os

import numpy as np
import pytest

from megatron_ascend.data import preprocess, tokenizer_training as tt
from megatron_ascend.data.indexed_dataset import IndexedDataset
from tests.test_data_common import stdlib_texts, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = stdlib_texts(8, 1500)
    return tt.train_hf_bpe([ln for t in texts for ln in t.split("\n") if ln.strip()],
                           str(tmp_path_factory.mktemp("tok")), vocab_size=300)


def _parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=3)
    return str(path)


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _ms(tok, *extra):
    return ["--tokenizer-name-or-path", tok, "--tokenizer-type", "PretrainedFromHF", "--workers", "1",
            *extra]


ALPACA = [{"instruction": f"Say {i}", "input": "" if i % 2 else f"twice {i}", "output": f"{i} {i}",
           "system": "Be brief." if i == 0 else ""} for i in range(7)]


def test_parquet_pretraining_equals_jsonl(tmp_path, tok, capsys):
    recs = [{"text": t, "meta": {"n": i}} for i, t in enumerate(stdlib_texts(7, 800))]
    pq_file = _parquet(tmp_path / "train-00000-of-00001.parquet", recs)
    js = write_jsonl(tmp_path / "c.jsonl", recs)
    assert preprocess.main(["--input", pq_file, "--output-prefix", str(tmp_path / "pq"), "--json-keys", "text",
                            "--handler-name", "GeneralPretrainHandler", "--append-eod", "--log-interval", "2",
                            "--overwrite-cache"] + _ms(tok)) == 0
    out = capsys.readouterr()
    assert "accepted, no effect here: --overwrite-cache" in out.out
    assert "processed 2 documents" in out.err  # --log-interval replaces the progress bar
    assert preprocess.main(["--input", js, "--output-prefix", str(tmp_path / "js"), "--append-eod",
                            "--no-progress", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            tok]) == 0
    a, b = _docs(str(tmp_path / "pq_text_document")), _docs(str(tmp_path / "js_text_document"))
    assert a == b and len(a) == 7
    # a directory input picks parquet files too
    assert preprocess.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "dir"), "--append-eod",
                            "--no-progress"] + _ms(tok)) == 0
    assert len(_docs(str(tmp_path / "dir_text_document"))) == 14  # the parquet and the JSONL file


def test_alpaca_handler_prompt_types(tmp_path, tok):
    from megatron_ascend.data.tokenizer import build_tokenizer
    pq_file = _parquet(tmp_path / "alpaca.parquet", ALPACA)
    js = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    # MindSpeed's deepseek3 template is our deepseek template: same ids and mask as our own --sft line
    assert preprocess.main(["--input", pq_file, "--output-prefix", str(tmp_path / "ms3"), "--handler-name",
                            "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3"] + _ms(tok)) == 0
    assert preprocess.main(["--input", js, "--output-prefix", str(tmp_path / "ours"), "--sft", "--prompt-type",
                            "deepseek", "--no-progress", "--tokenizer-type", "HuggingFaceTokenizer",
                            "--tokenizer-model", tok]) == 0
    for suf in ("_input_ids_document", "_loss_mask_document"):
        assert _docs(str(tmp_path / ("ms3" + suf))) == _docs(str(tmp_path / ("ours" + suf)))
    # deepseek2: <bos>{system}\n\nUser: {q}\n\nAssistant:{a}<eos>, loss on the answer and eos
    assert preprocess.main(["--input", pq_file, "--output-prefix", str(tmp_path / "ms2"), "--handler-name",
                            "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek2-lite"] + _ms(tok)) == 0
    t = build_tokenizer("HuggingFaceTokenizer", tok)
    ids, mask = _docs(str(tmp_path / "ms2_input_ids_document")), _docs(str(tmp_path / "ms2_loss_mask_document"))
    r = ALPACA[0]
    prompt = ([t.bos] + t.tokenize("Be brief.\n\n") + t.tokenize(f"User: {r['instruction']}\n{r['input']}\n\n"
                                                                 f"Assistant:"))
    answer = t.tokenize(r["output"]) + [t.eod]
    assert ids[0] == prompt + answer and mask[0] == [0] * len(prompt) + [1] * len(answer)


def test_map_keys_and_sharegpt(tmp_path, tok):
    renamed = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in ALPACA]
    src = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    keys = json.dumps({"prompt": "q", "query": "ctx", "response": "a"})
    assert preprocess.main(["--input", src, "--output-prefix", str(tmp_path / "mk"), "--handler-name",
                            "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3", "--map-keys", keys,
                            "--no-progress"] + _ms(tok)) == 0
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: r[k] for k in ("instruction", "input", "output")}
                                                   for r in ALPACA])
    assert preprocess.main(["--input", plain, "--output-prefix", str(tmp_path / "pl"), "--handler-name",
                            "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3", "--no-progress"]
                           + _ms(tok)) == 0
    assert _docs(str(tmp_path / "mk_input_ids_document")) == _docs(str(tmp_path / "pl_input_ids_document"))
    # sharegpt with its own tag names
    conv = [{"dialog": [{"who": "me", "text": r["instruction"]}, {"who": "bot", "text": r["output"]}]}
            for r in ALPACA]
    std = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]}
           for r in ALPACA]
    tags = json.dumps({"messages": "dialog", "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me",
                                                      "assistant_tag": "bot"}})
    for name, recs, extra in (("sg_custom", conv, ["--map-keys", tags]), ("sg_std", std, [])):
        src = write_jsonl(tmp_path / f"{name}.jsonl", recs)
        assert preprocess.main(["--input", src, "--output-prefix", str(tmp_path / name), "--handler-name",
                                "SharegptStyleInstructionHandler", "--prompt-type", "deepseek3", "--no-progress"]
                               + extra + _ms(tok)) == 0
    assert _docs(str(tmp_path / "sg_custom_loss_mask_document")) == _docs(str(tmp_path / "sg_std_loss_mask_document"))
    assert _docs(str(tmp_path / "sg_custom_input_ids_document")) == _docs(str(tmp_path / "sg_std_input_ids_document"))


@pytest.mark.parametrize("extra,msg", [
    (["--handler-name", "AlpacaStyleInstructionHandler", "--map-keys", "{bad"], "--map-keys '{bad' is not JSON"),
    (["--handler-name", "AlpacaStyleInstructionHandler", "--map-keys", '{"answer": "x"}'], "unknown for alpaca"),
    (["--map-keys", '{"prompt": "x"}'], "--map-keys renames instruction-record keys"),
    (["--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "deepseek3", "--enable-thinking", "true"],
     "--enable-thinking is not supported"),
    (["--handler-name", "GeneralPretrainHandler", "--sft"], "drop one"),
])
def test_bad_mindspeed_lines_are_one_error(tmp_path, tok, extra, msg, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    assert preprocess.main(["--input", src, "--output-prefix", str(tmp_path / "o"), "--no-progress"] + extra
                           + _ms(tok)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not any(f.startswith("o_") for f in os.listdir(tmp_path))
