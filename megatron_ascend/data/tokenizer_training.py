"""Train a tokenizer on a text corpus: SentencePiece (``.model``) or a byte-level BPE HuggingFace directory.

Owns: reading a corpus (plain text lines or JSONL keys), SentencePiece training with the ids this
library expects (unk 0, bos 1, eos 2, pad 3, DeepSeek chat tags as user-defined symbols), and a small
HF ``tokenizer.json`` + ``tokenizer_config.json`` (with a DeepSeek-style jinja ``chat_template``).
Used by ``tools/train_tokenizer.py`` and by the tests. Does not own: loading tokenizers (tokenizer.py).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Optional, Sequence

from .errors import DataError

DEEPSEEK_CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>")
HF_BOS, HF_EOS, HF_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"

# A DeepSeek-V3-style template (no tool calls), in the jinja dialect of HF tokenizer_config.json.
DEEPSEEK_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def iter_corpus(paths: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield text from ``.jsonl``/``.json`` files (the given keys of each line) or plain text files (each line)."""
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"--input {p!r} does not exist")
        jsonl = p.endswith((".jsonl", ".json"))
        with open(p, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not jsonl:
                    yield line.rstrip("\n")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}); fix or remove the line")
                for k in json_keys:
                    v = rec.get(k) if isinstance(rec, dict) else None
                    if isinstance(v, str):
                        for sub in v.split("\n"):
                            if sub.strip():
                                yield sub


def train_sentencepiece(sentences: Iterable[str], model_prefix: str, vocab_size: int = 1000,
                        model_type: str = "bpe", user_defined_symbols: Sequence[str] = DEEPSEEK_CHAT_TOKENS,
                        character_coverage: float = 1.0, byte_fallback: bool = True, num_threads: int = 1,
                        input_sentence_size: int = 0, seed_sentencepiece_size: int = 1000000) -> str:
    """Train and write ``{model_prefix}.model`` / ``.vocab``; returns the .model path.

    Ids: unk 0, bos 1 (``<s>``), eos 2 (``</s>``, the end-of-document token), pad 3 (``<pad>``).
    Lossless by default: identity normalization, whitespace kept, ``\n`` and ``\t`` as their own pieces
    (training sentences are lines, so they would otherwise never be seen) and byte fallback for unseen
    characters; ``detokenize(tokenize(text)) == text``. ``hard_vocab_limit`` is off so a small corpus gives
    a smaller vocab instead of an error.
    """
    import sentencepiece as spm
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise DataError(f"--model-type {model_type!r} is unknown; use bpe, unigram, char or word")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    data = [s for s in sentences if s]
    if not data:
        raise DataError("the tokenizer corpus is empty; pass --input files that contain text")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(data), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=["\n", "\t", *user_defined_symbols], normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=character_coverage, byte_fallback=byte_fallback, hard_vocab_limit=False,
            num_threads=num_threads, input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}")
    return model_prefix + ".model"


def train_hf_bpe(sentences: Iterable[str], out_dir: str, vocab_size: int = 1000,
                 chat_template: Optional[str] = DEEPSEEK_JINJA,
                 extra_special: Sequence[str] = DEEPSEEK_CHAT_TOKENS) -> str:
    """Train a byte-level BPE with DeepSeek's special tokens and write ``out_dir/tokenizer.json`` and
    ``tokenizer_config.json`` (bos / eos / pad and the chat template). Returns out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [HF_BOS, HF_EOS, HF_PAD, *extra_special]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {"bos_token": HF_BOS, "eos_token": HF_EOS, "pad_token": HF_PAD, "add_bos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    return out_dir
