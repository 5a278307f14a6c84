#!/usr/bin/env python
"""Tokenize JSONL into Megatron indexed datasets (PREFIX_text_document.bin/.idx), byte-compatible with
Megatron-LM's tools/preprocess_data.py output.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix out/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --json-keys text --append-eod --workers 8

    # instruction data (alpaca / sharegpt / messages JSONL), loss mask on assistant tokens:
    python tools/preprocess_data.py --sft --input sft.jsonl --output-prefix out/sft \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model DeepSeek-V3/ --prompt-type auto

Flags and formats: docs/DATA.md. Errors print one line (``error: ...``) and exit 1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
