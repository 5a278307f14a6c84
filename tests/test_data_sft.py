"""SFT data: record forms, chat templates, loss masks exactly on assistant spans, packing that keeps
samples apart (same loss as one by one, with a tiny causal model of our own), and --sft preprocessing."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ascend.data import preprocess
from megatron_ascend.data.errors import DataError
from megatron_ascend.data.masks import block_causal_mask
from megatron_ascend.data.sampler import PretrainingSampler, build_data_iterator
from megatron_ascend.data.sft_dataset import SFTDataset, build_sft_datasets, first_fit_decreasing, open_sft_data
from megatron_ascend.data.sft_format import record_to_messages
from megatron_ascend.data.tokenizer import build_tokenizer
from megatron_ascend.data.tokenizer_training import train_hf_bpe

from tolerance import assert_close
from test_data_common import data_root, hf_dir, sp_model, texts, write_jsonl  # noqa: F401


def _snippets(texts, n, rng):
    lines = [ln.strip() for t in texts for ln in t.split("\n") if 8 < len(ln.strip()) < 60]
    return [lines[i] for i in rng.randint(0, len(lines), size=n)]


def _records(texts, n=24, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        s = _snippets(texts, 6, rng)
        kind = i % 3
        if kind == 0:
            out.append({"instruction": s[0], "input": s[1] if i % 2 else "", "output": s[2]})
        elif kind == 1:
            out.append({"system": s[5], "conversations": [{"from": "human", "value": s[0]},
                                                          {"from": "gpt", "value": s[1]},
                                                          {"from": "human", "value": s[2]},
                                                          {"from": "gpt", "value": s[3]}]})
        else:
            out.append({"messages": [{"role": "user", "content": s[0]}, {"role": "assistant", "content": s[1]}]})
    return out


def test_record_forms():
    assert record_to_messages({"instruction": "Do", "input": "this", "output": "ok", "system": "S"}) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Do\nthis"},
        {"role": "assistant", "content": "ok"}]
    assert record_to_messages({"instruction": "Q", "output": "A", "history": [["q0", "a0"]]})[:2] == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    assert record_to_messages({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}) \
        == [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    with pytest.raises(DataError, match="f.jsonl:7: cannot tell the SFT format"):
        record_to_messages({"prompt": "x"}, where="f.jsonl:7")
    with pytest.raises(DataError, match="from='robot'"):
        record_to_messages({"conversations": [{"from": "robot", "value": "x"}]})


@pytest.mark.parametrize("kind,fixture,template", [("SentencePieceTokenizer", "sp_model", "deepseek"),
                                                   ("HuggingFaceTokenizer", "hf_dir", "tokenizer"),
                                                   ("HuggingFaceTokenizer", "hf_dir", "deepseek")])
def test_loss_mask_is_exactly_the_assistant_spans(request, texts, kind, fixture, template):
    tok = build_tokenizer(kind, request.getfixturevalue(fixture))
    for rec in _records(texts, 9):
        msgs = record_to_messages(rec)
        ids, mask = tok.apply_chat_template(msgs, return_loss_mask=True, template=template)
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        # the runs of 1s are, in order, exactly each assistant message's tokens followed by eos
        runs, cur = [], None
        for i, m in zip(ids, mask):
            if m and cur is None:
                cur = []
            if m:
                cur.append(i)
            elif cur is not None:
                runs.append(cur)
                cur = None
        if cur is not None:
            runs.append(cur)
        want = [tok.tokenize(m["content"]) + [tok.eod] for m in msgs if m["role"] == "assistant"]
        assert runs == want
        # and everything else is the prompt: bos, system, user turns with their tags
        prompt = [i for i, m in zip(ids, mask) if not m]
        assert prompt[0] == tok.bos
        assert tok.detokenize(prompt[1:]).count("<｜User｜>") == sum(m["role"] == "user" for m in msgs)


def test_tokenizer_template_equals_named_deepseek(hf_dir, texts):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    for rec in _records(texts, 6, seed=1):
        msgs = record_to_messages(rec)
        assert (tok.apply_chat_template(msgs, return_loss_mask=True, template="tokenizer")
                == tok.apply_chat_template(msgs, return_loss_mask=True, template="deepseek"))
    gen = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True)
    assert gen[-1] == tok.token_to_id("<｜Assistant｜>")


def test_unstable_template_and_bad_conversations(tmp_path, texts):
    lines = [ln for t in texts[:5] for ln in t.split("\n") if ln.strip()]
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = build_tokenizer("HuggingFaceTokenizer", train_hf_bpe(lines, str(tmp_path / "u"), 300, unstable))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="not prefix-stable.*--prompt-type deepseek"):
        tok.apply_chat_template(msgs, return_loss_mask=True)
    with pytest.raises(DataError, match="no assistant message"):
        tok.apply_chat_template(msgs[:1], template="deepseek")
    with pytest.raises(DataError, match="role 'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], template="deepseek")
    with pytest.raises(DataError, match="chat template 'chatml' is unknown"):
        tok.apply_chat_template(msgs, template="chatml")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, hf_dir, texts):
    d = tmp_path_factory.mktemp("sft")
    recs = _records(texts, 30)
    lines = [json.dumps(r) for r in recs]
    lines.insert(5, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))  # bad: skipped
    src = write_jsonl(d / "sft.jsonl", lines)
    prefix = str(d / "out" / "sft")
    rc = preprocess.main(["--sft", "--input", src, "--output-prefix", prefix, "--tokenizer-type",
                          "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--workers", "2", "--chunk-bytes",
                          "2000", "--on-bad-line", "skip", "--no-progress"])
    assert rc == 0
    return prefix, recs, build_tokenizer("HuggingFaceTokenizer", hf_dir)


def test_preprocess_sft_writes_ids_and_mask(sft_data, tmp_path, hf_dir, capsys):
    prefix, recs, tok = sft_data
    ids_ds, mask_ds = open_sft_data(prefix)
    assert len(ids_ds) == len(recs) and mask_ds.dtype == np.uint8
    for i, rec in enumerate(recs):
        ids, mask = tok.apply_chat_template(record_to_messages(rec), return_loss_mask=True)
        assert ids_ds[i].tolist() == ids and mask_ds[i].tolist() == mask
    bad = write_jsonl(tmp_path / "b.jsonl", [json.dumps(recs[0]), json.dumps({"messages": [{"role": "user",
                                                                                            "content": "x"}]})])
    assert preprocess.main(["--sft", "--input", bad, "--output-prefix", str(tmp_path / "b"), "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--no-progress"]) == 1
    assert "b.jsonl:2: the conversation has no assistant message" in capsys.readouterr().err


def test_first_fit_decreasing():
    rng = np.random.RandomState(0)
    lens = rng.randint(1, 30, size=200).tolist()
    bins = first_fit_decreasing(lens, 32)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lens[i] for i in b) <= 32 for b in bins)
    assert len(bins) <= math.ceil(sum(lens) / 32) * 1.25 + 1


def test_packed_fields_keep_samples_apart(sft_data):
    prefix, recs, tok = sft_data
    ids_ds, mask_ds = open_sft_data(prefix)
    seq = 96
    ds = SFTDataset(ids_ds, mask_ds, seq, pack=True, pad=tok.pad, seed=3)
    seen = []
    for k in range(len(ds)):
        item, convs = ds[k], ds.conversations(k)
        seen += convs
        at = 0
        for j, c in enumerate(convs):
            ids, m = ids_ds[c].astype(np.int64), mask_ds[c]
            n = len(ids) - 1
            assert item["tokens"][at:at + n].tolist() == ids[:-1].tolist()
            assert item["labels"][at:at + n].tolist() == ids[1:].tolist()
            assert item["loss_mask"][at:at + n].tolist() == m[1:].astype(float).tolist()
            assert item["position_ids"][at:at + n].tolist() == list(range(n))
            assert (item["segment_ids"][at:at + n] == j).all()
            at += n
        assert at <= seq and (item["loss_mask"][at:] == 0).all() and (item["segment_ids"][at:] == len(convs)).all()
    kept = [i for i in range(len(ids_ds)) if len(ids_ds[i]) - 1 <= seq]
    assert sorted(seen) == kept and ds.num_dropped == len(ids_ds) - len(kept)
    assert len(ds) < len(kept)  # it did pack


class TinyCausalLM(torch.nn.Module):
    """Embedding + learned positions + one causal attention block + MLP; honours position_ids and
    segment_ids the way the trainer's model must."""

    def __init__(self, vocab, d=32, max_pos=256):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(max_pos, d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, tokens, position_ids, segment_ids):  # [b, s] each
        h = self.emb(tokens) + self.pos(position_ids)  # [b, s, d]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [b, s, s]
        scores = scores.masked_fill(~block_causal_mask(segment_ids)[:, 0], float("-inf"))
        h = h + self.proj(torch.softmax(scores, dim=-1) @ v)
        return self.out(h + self.mlp(h))


def _loss_sum(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], batch["segment_ids"])
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    return (ce * batch["loss_mask"].flatten().to(ce.dtype)).sum(), batch["loss_mask"].sum()


def test_packed_loss_equals_one_by_one(sft_data):
    prefix, _, tok = sft_data
    ids_ds, mask_ds = open_sft_data(prefix)
    torch.manual_seed(0)
    model = TinyCausalLM(tok.padded_vocab_size).double()
    seq = 96
    packed = SFTDataset(ids_ds, mask_ds, seq, pack=True, pad=tok.pad, seed=1)
    single = SFTDataset(ids_ds, mask_ds, seq, pack=False, pad=tok.pad, seed=1)
    assert len(packed) < len(single)

    def total(ds, mbs):
        loss, count = 0.0, 0.0
        for batch in build_data_iterator(ds, PretrainingSampler(len(ds), 0, mbs, 0, 1, drop_last=False)):
            s, c = _loss_sum(model, batch)
            loss, count = loss + s, count + c
        return loss, count

    lp, cp = total(packed, 3)
    ls, cs = total(single, 4)
    assert cp == cs > 0
    # fp64, the same math batched otherwise: the sum over every token (cp of them) regroups, and each token's loss
    # is a chain of sums (d 32, keys <= seq, MLP 2d, the vocab); gradients run the chain back as well
    chain = 32 + seq + 2 * 32 + tok.padded_vocab_size
    assert_close(lp, ls, "packed vs one-by-one loss sum", terms=int(cp) + chain)
    gp = torch.autograd.grad(lp / cp, list(model.parameters()))
    gs = torch.autograd.grad(ls / cs, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), gp, gs):
        assert_close(a, b, f"packed vs one-by-one grad of {name}", terms=int(cp) + 2 * chain)


def test_sft_epochs_split_and_truncate(sft_data):
    prefix, recs, tok = sft_data
    train, valid, test = build_sft_datasets([prefix], "8,2", [50, 4, 0], 96, seed=0, pack=False, pad=tok.pad)
    assert test is None and len(train) >= 50 and len(valid) >= 4
    n_train_convs = len(set(train.items.tolist()))
    assert len(train) == math.ceil(50 / n_train_convs) * n_train_convs  # whole epochs, each a permutation
    assert sorted(train.order[:n_train_convs].tolist()) == list(range(n_train_convs))
    ids_ds, mask_ds = open_sft_data(prefix)
    short = SFTDataset(ids_ds, mask_ds, 12, truncate=True, pad=tok.pad)
    item = short[0]
    assert item["tokens"].shape == (12,) and item["segment_ids"].max() == 0
    with pytest.raises(DataError, match="no conversation .* fits seq_length 4"):
        SFTDataset(ids_ds, mask_ds, 4, pad=tok.pad)


def test_blended_sft_and_tiny_splits(sft_data):
    prefix, recs, tok = sft_data
    tr, va, te = build_sft_datasets(["0.5", prefix, "0.5", prefix], "29,1,0", [40, 2, 0], 96, seed=0, pack=True,
                                    pad=tok.pad)
    assert te is None and len(tr) == 40 and set(tr[0]) == {"tokens", "labels", "loss_mask", "position_ids",
                                                            "segment_ids"}
    tr, va, te = build_sft_datasets([prefix], "1000,1,1", [10, 2, 2], 96, seed=0, pad=tok.pad)
    assert va is None and te is None  # nothing left for them in 30 conversations


def test_alpaca_json_array_and_template_sources(tmp_path, hf_dir, texts):
    import shutil
    from megatron_ascend.data.tokenizer_training import DEEPSEEK_JINJA
    recs = [r for r in _records(texts, 9) if "instruction" in r]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(recs, indent=2))
    assert preprocess.main(["--sft", "--input", str(tmp_path / "alpaca_data.json"), "--output-prefix",
                            str(tmp_path / "a"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            hf_dir, "--sft-format", "alpaca", "--no-progress"]) == 0
    ids_ds, _ = open_sft_data(str(tmp_path / "a"))
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    assert [ids_ds[i].tolist() for i in range(len(ids_ds))] == [
        tok.apply_chat_template(record_to_messages(r)) for r in recs]
    # the template may also come from chat_template.jinja, or as a list of named templates
    for form in ("jinja_file", "list"):
        d = tmp_path / form
        shutil.copytree(hf_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        if form == "list":
            cfg["chat_template"] = [{"name": "tool_use", "template": "x"},
                                    {"name": "default", "template": DEEPSEEK_JINJA}]
        else:
            (d / "chat_template.jinja").write_text(DEEPSEEK_JINJA)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        assert build_tokenizer("HuggingFaceTokenizer", str(d)).chat_template == DEEPSEEK_JINJA
