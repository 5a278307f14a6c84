"""Name mapping between transformers' DeepseekV4ForCausalLM tensors and ours (the in-memory names transformers
loads from a safetensors directory; DeepSeek's original names and FP8 / FP4 are the converter's layer on top).

Our names equal transformers' except:
  * grouped experts: ours ``...mlp.experts.{gate_proj,up_proj}`` ``[E, I, h]`` and ``...mlp.experts.down_proj``
    ``[E, h, I]``; transformers fuses ``experts.gate_up_proj [E, 2I, h]`` (gate rows first) and keeps
    ``experts.down_proj [E, h, I]``. The fused form is what we export (transformers' V4 reads no per-expert names).
  * MTP (transformers builds none and ignores ``mtp.*``): ours ``mtp.layers.{k}.X``, HF ``mtp.{k}.X`` with the
    same X as a decoder layer's (``self_attn.q_a_proj.weight``, ``mlp.experts.gate_up_proj``, ``attn_hc.fn``, ...)
    plus ``e_proj`` / ``h_proj`` / ``enorm`` / ``hnorm`` / ``norm`` ``.weight`` and ``hc_head.{hc_fn,hc_base,
    hc_scale}``. DeepSeek's original checkpoints call it ``mtp.{k}.`` too (with original leaf names).
  * vocab rows may be padded on our side (models/deepseek/hf_names.pad_vocab).
The hash layers' ``mlp.gate.tid2eid`` (int64 buffer) keeps its name and dtype.

Same three functions as models/deepseek/hf_names.py (which dispatches here for model_type deepseek_v4).
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

import torch

from ...config import ModelConfig

_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.*)$")
_HF_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


def _hf_base(ma_name: str) -> str:
    m = _MTP.match(ma_name)
    return f"mtp.{m.group(1)}.{m.group(2)}" if m else ma_name


def hf_names_for(ma_name: str, cfg: ModelConfig) -> List[str]:
    """The HF tensor ``ma_name`` is read from / written to (gate_proj and up_proj share the fused one)."""
    base = _hf_base(ma_name)
    m = _EXPERT.match(base)
    if not m:
        return [base]
    prefix, part = m.groups()
    return [f"{prefix}.gate_up_proj" if part in ("gate_proj", "up_proj") else f"{prefix}.down_proj"]


def fused_rows(ma_name: str, cfg: ModelConfig) -> Optional[Tuple[int, int]]:
    """Rows [start, stop) of dim 1 of the fused HF ``gate_up_proj`` that ``ma_name`` is, or None."""
    m = _EXPERT.match(_hf_base(ma_name))
    if not m or m.group(2) == "down_proj":
        return None
    inter = cfg.moe_intermediate_size
    return (0, inter) if m.group(2) == "gate_proj" else (inter, 2 * inter)


def hf_tensor_for(ma_name: str, get: Callable[[str], Optional[torch.Tensor]], cfg: ModelConfig) -> torch.Tensor:
    """Full tensor for ``ma_name``; ``get(hf_name)`` returns the HF tensor or None when absent."""
    hn = hf_names_for(ma_name, cfg)[0]
    t = get(hn)
    if t is None:
        raise KeyError(f"HF state dict has no {hn!r} (needed for {ma_name!r})")
    rows = fused_rows(ma_name, cfg)
    return t[:, rows[0]:rows[1]] if rows is not None else t


def ma_name_for(hf_name: str, cfg: ModelConfig) -> Optional[Tuple[str, Optional[int], Optional[str]]]:
    """(our name, None, 'gate_up' for the fused expert tensor else None) for an HF name."""
    m = _HF_MTP.match(hf_name)
    name = f"mtp.layers.{m.group(1)}.{m.group(2)}" if m else hf_name
    if name.endswith(".mlp.experts.gate_up_proj"):
        return name[: -len("gate_up_proj")] + "gate_proj", None, "gate_up"
    return name, None, None
