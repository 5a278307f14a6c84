"""Tokenizers behind one interface, built by :func:`build_tokenizer` from ``--tokenizer-type`` / ``--tokenizer-model``.

Owns: SentencePieceTokenizer (a ``.model`` file), HuggingFaceTokenizer (a directory with ``tokenizer.json``
and optionally ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja``, the form the
DeepSeek tokenizers ship in), NullTokenizer (ids written as numbers, for mock data), the eod / pad / bos
choice and the padded vocab size. Does not own: chat formats (chat_templates.py).

Every tokenizer has ``tokenize(text) -> list[int]`` (no special tokens added), ``detokenize(ids)``,
``vocab_size``, ``padded_vocab_size`` (Megatron's rule: a multiple of make_vocab_size_divisible_by x TP),
``eod`` (the end-of-document id, = eos), ``pad`` (pad id, eod when the tokenizer has none), ``bos`` (or None)
and ``apply_chat_template(messages)``.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Dict, List, Optional, Sequence

from ..config import padded_vocab_size as _padded_vocab_size
from . import chat_templates
from .errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class Tokenizer(abc.ABC):
    """The shared interface and the chat-template plumbing. Subclasses set the ids and implement tokenize."""

    name = "base"
    vocab_size: int
    eod: int
    pad: int
    bos: Optional[int]
    chat_template: Optional[str] = None  # jinja source of the tokenizer's own template, if it has one

    def __init__(self, make_vocab_size_divisible_by: int = 128, tp: int = 1):
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.tp = tp

    @property
    def padded_vocab_size(self) -> int:
        return _padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tp)

    @property
    def eos(self) -> int:
        return self.eod

    @abc.abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Implemented by every concrete tokenizer."""

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    @abc.abstractmethod
    def detokenize(self, ids) -> str:
        """Implemented by every concrete tokenizer."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> Optional[int]:
        """Implemented by every concrete tokenizer."""

    def special_token_strings(self) -> Dict[str, Optional[str]]:
        return {"bos_token": None, "eos_token": None, "pad_token": None}

    # -- chat -------------------------------------------------------------------------------
    def chat_template_for(self, name: Optional[str] = None):
        """``None``/'auto': the tokenizer's own template if it has one, else 'deepseek'; 'tokenizer': its own;
        any name in chat_templates.NAMED_TEMPLATES: that template."""
        if name in (None, "auto"):
            name = "tokenizer" if self.chat_template else "deepseek"
        if name == "tokenizer":
            if not self.chat_template:
                raise DataError(f"{self.name} has no chat_template (tokenizer_config.json 'chat_template' or "
                                f"chat_template.jinja); use --prompt-type deepseek")
            return chat_templates.JinjaTemplate(self.chat_template, self.special_token_strings())
        if name not in chat_templates.NAMED_TEMPLATES:
            raise DataError(f"chat template {name!r} is unknown; use 'tokenizer' (the tokenizer's own) or one of "
                            f"{', '.join(chat_templates.NAMED_TEMPLATES)}")
        return chat_templates.NAMED_TEMPLATES[name]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, return_loss_mask: bool = False,
                            template: Optional[str] = None):
        """Token ids of a conversation (list of {'role', 'content'}); with return_loss_mask also the 0/1 mask
        that is 1 exactly on assistant tokens (content and the end-of-turn token)."""
        tpl = self.chat_template_for(template)
        ids, mask = chat_templates.encode_chat(self.tokenize, tpl, messages, self.bos, self.eod,
                                               add_generation_prompt)
        return (ids, mask) if return_loss_mask else ids


class SentencePieceTokenizer(Tokenizer):
    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, **kw):
        super().__init__(**kw)
        if not os.path.isfile(model_file):
            raise DataError(f"--tokenizer-model {model_file!r} does not exist; pass a SentencePiece .model file "
                            f"(tools/train_tokenizer.py makes one)")
        import sentencepiece as spm
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise DataError(f"--tokenizer-model {model_file!r} is not a SentencePiece model ({e})")
        self.model_file = model_file
        self.vocab_size = int(self._sp.get_piece_size())
        if self._sp.eos_id() < 0:
            raise DataError(f"SentencePiece model {model_file!r} has no eos piece, which is used as end-of-document; "
                            f"train it with eos_id >= 0 (tools/train_tokenizer.py does)")
        self.eod = int(self._sp.eos_id())
        self.bos = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eod

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts):
        return self._sp.encode(list(texts))

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)

    def special_token_strings(self):
        f = lambda i: self._sp.id_to_piece(i) if i is not None and i >= 0 else None  # noqa: E731
        return {"bos_token": f(self.bos), "eos_token": f(self.eod), "pad_token": f(self.pad)}


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizers`` fast tokenizer read straight from ``tokenizer.json`` (no ``transformers`` import)."""

    name = "HuggingFaceTokenizer"
    _EOS_GUESSES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        if os.path.isdir(path):
            tok_file, cfg_dir = os.path.join(path, "tokenizer.json"), path
        else:
            tok_file, cfg_dir = path, os.path.dirname(path)
        if not os.path.isfile(tok_file):
            raise DataError(f"--tokenizer-model {path!r}: no tokenizer.json found; pass the directory of a "
                            f"HuggingFace tokenizer (with tokenizer.json) or the tokenizer.json file")
        from tokenizers import Tokenizer as _Tok
        try:
            self._tok = _Tok.from_file(tok_file)
        except Exception as e:
            raise DataError(f"{tok_file}: not a valid tokenizers JSON file ({e})")
        self.path = path
        cfg = self._read_json(os.path.join(cfg_dir, "tokenizer_config.json"))
        smap = self._read_json(os.path.join(cfg_dir, "special_tokens_map.json"))
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # [{name, template}, ...]: the 'default' one
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        jinja_file = os.path.join(cfg_dir, "chat_template.jinja")
        if tpl is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                tpl = f.read()
        self.chat_template = tpl
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        tok = {k: _token_str(cfg.get(k)) or _token_str(smap.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        if tok["eos_token"] is None:
            tok["eos_token"] = next((g for g in self._EOS_GUESSES if self._tok.token_to_id(g) is not None), None)
        self._special = tok
        ids = {k: (self._tok.token_to_id(v) if v is not None else None) for k, v in tok.items()}
        if ids["eos_token"] is None:
            raise DataError(f"{path}: the tokenizer has no eos token (used as end-of-document); set 'eos_token' in "
                            f"tokenizer_config.json")
        self.eod = int(ids["eos_token"])
        self.bos = ids["bos_token"]
        self.pad = ids["pad_token"] if ids["pad_token"] is not None else self.eod

    @staticmethod
    def _read_json(p: str) -> dict:
        if not os.path.isfile(p):
            return {}
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e})")

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def special_token_strings(self):
        return dict(self._special)


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated ids; eod = vocab_size - 1 (Megatron's NullTokenizer). For mock data."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int, **kw):
        super().__init__(**kw)
        self.vocab_size = int(vocab_size)
        self.eod = self.pad = self.vocab_size - 1
        self.bos = None

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def token_to_id(self, token: str):
        return None


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str], make_vocab_size_divisible_by: int = 128,
                    tp: int = 1, vocab_size: Optional[int] = None) -> Tokenizer:
    kw = dict(make_vocab_size_divisible_by=make_vocab_size_divisible_by, tp=tp)
    if make_vocab_size_divisible_by < 1 or tp < 1:
        raise DataError(f"make_vocab_size_divisible_by {make_vocab_size_divisible_by} and tp {tp} must be >= 1")
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not tokenizer_model:
            raise DataError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH.model")
        return SentencePieceTokenizer(tokenizer_model, **kw)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise DataError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (with tokenizer.json)")
        return HuggingFaceTokenizer(tokenizer_model, **kw)
    if tokenizer_type == "NullTokenizer":
        n = vocab_size if vocab_size is not None else (int(tokenizer_model) if tokenizer_model else None)
        if not n:
            raise DataError("--tokenizer-type NullTokenizer needs --vocab-size N")
        return NullTokenizer(n, **kw)
    raise DataError(f"--tokenizer-type {tokenizer_type!r} is unknown; use one of {', '.join(TOKENIZER_TYPES)}")
