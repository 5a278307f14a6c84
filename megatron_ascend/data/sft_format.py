"""Instruction-data records -> role/content messages.

Owns the three record forms accepted by SFT preprocessing (``--sft-format auto`` picks by keys):

- alpaca:   ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``; the user turn is
            instruction, then a newline and input when input is non-empty (LLaMA-Factory's rule).
- sharegpt: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}], "system"?}``
- messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}`` (OpenAI style)

Does not own: the chat template (chat_templates.py).
"""
from __future__ import annotations

from typing import List

from .errors import DataError

# the two datasets written by preprocess_data.py --sft (here, not in sft_dataset.py, so preprocessing
# does not import torch)
INPUT_IDS_SUFFIX, LOSS_MASK_SUFFIX = "_input_ids_document", "_loss_mask_document"

SFT_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "bot": "assistant", "system": "system"}


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    raise DataError(f"cannot tell the SFT format of a record with keys {sorted(rec)[:8]}; expected alpaca "
                    f"(instruction/input/output), sharegpt (conversations) or messages; or pass --sft-format")


def _str(rec: dict, key: str, where: str, required: bool = True) -> str:
    v = rec.get(key, None)
    if v is None:
        if required:
            raise DataError(f"{where}: missing key {key!r}")
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} is {type(v).__name__}, expected a string")
    return v


def record_to_messages(rec, fmt: str = "auto", where: str = "record") -> List[dict]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a JSON object was expected, got {type(rec).__name__}")
    if fmt not in SFT_FORMATS:
        raise DataError(f"--sft-format {fmt!r} is unknown; use one of {', '.join(SFT_FORMATS)}")
    if fmt == "auto":
        try:
            fmt = detect_format(rec)
        except DataError as e:
            raise DataError(f"{where}: {e}")
    msgs: List[dict] = []
    if fmt == "alpaca":
        system = _str(rec, "system", where, required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise DataError(f"{where}: 'history' must be a list of [query, response] pairs")
        for h in history:
            if not (isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise DataError(f"{where}: 'history' entry {h!r} is not a [query, response] pair of strings")
            msgs += [{"role": "user", "content": h[0]}, {"role": "assistant", "content": h[1]}]
        inst, inp = _str(rec, "instruction", where), _str(rec, "input", where, required=False)
        msgs.append({"role": "user", "content": inst + ("\n" + inp if inp else "")})
        msgs.append({"role": "assistant", "content": _str(rec, "output", where)})
        return msgs
    if fmt == "sharegpt":
        conv = rec.get("conversations")
        if not isinstance(conv, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
        system = _str(rec, "system", where, required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        for i, t in enumerate(conv):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(f"{where}: conversations[{i}] is {t!r}; each turn needs 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{i}] has from={t['from']!r}; use human/gpt/system")
            msgs.append({"role": role, "content": t["value"]})
        return msgs
    conv = rec.get("messages")
    if not isinstance(conv, list):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} messages")
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] is {m!r}; each message needs 'role' and 'content'")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs
