"""Chat templates: turn role/content messages into token ids plus a loss mask on assistant tokens.

Owns: the named templates (``deepseek`` = ``deepseek3``, DeepSeek-V3's format; ``deepseek2`` =
``deepseek2-lite``, DeepSeek-V2's, as MindSpeed-LLM's --prompt-type names them), rendering a tokenizer's
own jinja ``chat_template`` (as
``transformers`` does: sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``) and
:func:`encode_chat`. Does not own: reading JSONL records (sft_format.py) or tokenizers (tokenizer.py).

A template yields *segments* ``(text_or_ids, trainable)``; each segment is tokenized on its own and the
ids of trainable segments get loss-mask 1. Encoding per segment (as LLaMA-Factory / MindSpeed-LLM's
``encode_multiturn`` does) puts a token boundary at every span edge, so the mask is exact.

For a jinja template the assistant spans are found from prefix renders: the span of assistant message i
is ``render(messages[:i], add_generation_prompt=True)`` .. ``render(messages[:i+1])``. A template whose
renders are not prefixes of each other (e.g. one that rewrites earlier turns) is refused with a message
that points to ``--prompt-type deepseek``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import DataError

Segment = Tuple[Union[str, List[int]], bool]
ROLES = ("system", "user", "assistant")


def validate_messages(messages: Sequence[dict], where: str = "", require_assistant: bool = True) -> None:
    at = f"{where}: " if where else ""
    if not messages:
        raise DataError(f"{at}the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}message {i} is {m!r}; each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{at}message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{at}message {i} content is {type(m['content']).__name__}, not a string")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{at}message {i} is a system message; only the first message may be 'system'")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}the conversation has no assistant message, so nothing would be trained on")


class DeepSeekTemplate:
    """DeepSeek-V3 chat format (what its tokenizer_config.json template renders, without tool calls)::

        <bos>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<eos><｜User｜>...

    Trainable: each assistant content and the eos after it. ``<｜Assistant｜>`` belongs to the prompt.
    """

    name = "deepseek"
    user_tag = "<｜User｜>"
    assistant_tag = "<｜Assistant｜>"

    def segments(self, messages, bos: Optional[int], eos: int, add_generation_prompt: bool = False) -> List[Segment]:
        segs: List[Segment] = []
        if bos is not None:
            segs.append(([bos], False))
        for m in messages:
            if m["role"] == "system":
                segs.append((m["content"], False))
            elif m["role"] == "user":
                segs.append((self.user_tag + m["content"] + self.assistant_tag, False))
            else:
                segs.append((m["content"], True))
                segs.append(([eos], True))
        if add_generation_prompt and messages and messages[-1]["role"] != "user":
            segs.append((self.assistant_tag, False))
        return segs


class DeepSeekV2Template:
    """DeepSeek-V2 / V2-Lite chat format, as MindSpeed-LLM's ``--prompt-type deepseek2`` renders it::

        <bos>{system}\n\nUser: {user}\n\nAssistant:{assistant}<eos>User: ...

    Trainable: each assistant content and the eos after it.
    """

    name = "deepseek2"

    def segments(self, messages, bos: Optional[int], eos: int, add_generation_prompt: bool = False) -> List[Segment]:
        segs: List[Segment] = []
        if bos is not None:
            segs.append(([bos], False))
        for m in messages:
            if m["role"] == "system":
                segs.append((m["content"] + "\n\n", False))
            elif m["role"] == "user":
                segs.append(("User: " + m["content"] + "\n\nAssistant:", False))
            else:
                segs.append((m["content"], True))
                segs.append(([eos], True))
        if add_generation_prompt and messages and messages[-1]["role"] != "user":
            segs.append(("Assistant:", False))
        return segs


# our names, and MindSpeed-LLM's --prompt-type names for the same formats
NAMED_TEMPLATES = {"deepseek": DeepSeekTemplate(), "deepseek3": DeepSeekTemplate(), "deepseek2": DeepSeekV2Template(),
                   "deepseek2-lite": DeepSeekV2Template()}


class JinjaTemplate:
    """A tokenizer's own ``chat_template`` (jinja source) rendered the way ``transformers`` renders it."""

    name = "tokenizer"

    def __init__(self, source: str, special_tokens: Dict[str, Optional[str]]):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 ships with transformers
            raise DataError(f"rendering the tokenizer's chat template needs jinja2 ({e}); pip install jinja2, or "
                            f"use --prompt-type deepseek")

        def raise_exception(msg):
            raise TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            import json
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            import datetime
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.filters["tojson"] = tojson
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise DataError(f"the tokenizer's chat_template does not compile: {e}")
        self._special = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateError as e:
            raise DataError(f"the tokenizer's chat_template failed on this conversation: {e}")

    def _render_prefix(self, messages) -> str:
        if messages:
            return self.render(messages, add_generation_prompt=True)
        try:  # an assistant message first: the prompt is whatever the template puts before any turn
            return self.render([], add_generation_prompt=True)
        except DataError:
            return ""

    def segments(self, messages, bos=None, eos=None, add_generation_prompt: bool = False) -> List[Segment]:
        full = self.render(messages, add_generation_prompt)
        segs: List[Segment] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._render_prefix(messages[:i])
            end = self.render(messages[: i + 1])
            if not (end.startswith(start) and full.startswith(end) and len(start) >= pos):
                raise DataError("the tokenizer's chat_template is not prefix-stable (rendering the first turns does "
                                "not give a prefix of the whole conversation), so assistant spans cannot be found; "
                                "use --prompt-type deepseek (or another named template)")
            if start[pos:]:
                segs.append((start[pos:], False))
            segs.append((end[len(start):], True))
            pos = len(end)
        if full[pos:]:
            segs.append((full[pos:], False))
        return segs


def encode_chat(tokenize: Callable[[str], List[int]], template, messages, bos: Optional[int], eos: int,
                add_generation_prompt: bool = False, where: str = "") -> Tuple[List[int], List[int]]:
    """Token ids and loss mask (1 on assistant tokens) for one conversation."""
    validate_messages(messages, where, require_assistant=not add_generation_prompt)
    ids: List[int] = []
    mask: List[int] = []
    for piece, trainable in template.segments(messages, bos, eos, add_generation_prompt):
        toks = list(piece) if isinstance(piece, list) else tokenize(piece)
        ids.extend(toks)
        mask.extend([int(trainable)] * len(toks))
    return ids, mask
