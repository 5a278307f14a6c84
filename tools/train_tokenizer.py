#!/usr/bin/env python
"""Train a SentencePiece tokenizer (default) or a byte-level BPE HuggingFace tokenizer on a text corpus.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --model-prefix out/tok --vocab-size 32000
    python tools/train_tokenizer.py --input a.txt b.txt --library huggingface --output-dir out/hf_tok --vocab-size 8000

SentencePiece ids: unk 0, bos 1, eos 2 (end of document), pad 3; lossless (identity normalization, newlines
and tabs kept, byte fallback); the DeepSeek chat tags <｜User｜> and
<｜Assistant｜> are user-defined symbols (one token each) unless --no-chat-tokens. The HuggingFace output is a
directory with tokenizer.json and tokenizer_config.json (bos/eos/pad and a DeepSeek-style chat_template).
Errors print one line and exit 1.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.data.errors import DataError  # noqa: E402
from megatron_ascend.data import tokenizer_training as tt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="text files (one sentence per line) or JSONL files")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys read from .jsonl/.json inputs")
    p.add_argument("--library", choices=("sentencepiece", "huggingface"), default="sentencepiece")
    p.add_argument("--model-prefix", help="sentencepiece: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--output-dir", help="huggingface: directory for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--no-byte-fallback", action="store_true", help="unseen characters become <unk>")
    p.add_argument("--input-sentence-size", type=int, default=0, help="sample this many sentences (0 = all)")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-chat-tokens", action="store_true", help="do not add the DeepSeek chat tags")
    a = p.parse_args(argv)
    try:
        extra = () if a.no_chat_tokens else tt.DEEPSEEK_CHAT_TOKENS
        if a.vocab_size < 16:
            raise DataError(f"--vocab-size {a.vocab_size} is too small; use at least 16")
        sentences = tt.iter_corpus(a.input, a.json_keys)
        if a.library == "sentencepiece":
            if not a.model_prefix:
                raise DataError("--library sentencepiece needs --model-prefix PATH")
            out = tt.train_sentencepiece(sentences, a.model_prefix, a.vocab_size, a.model_type, extra,
                                         a.character_coverage, not a.no_byte_fallback, a.num_threads,
                                         a.input_sentence_size)
        else:
            if not a.output_dir:
                raise DataError("--library huggingface needs --output-dir DIR")
            out = tt.train_hf_bpe(sentences, a.output_dir, a.vocab_size, extra_special=extra)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
