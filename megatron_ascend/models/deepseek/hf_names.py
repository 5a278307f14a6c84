"""Name mapping between HuggingFace DeepSeek tensors and ours (shared with the checkpoint converter).

Our names equal HF's except:
  * grouped experts: ours ``...mlp.experts.{gate_proj,up_proj}`` ``[E, I, h]`` and ``...mlp.experts.down_proj``
    ``[E, h, I]``; HF in memory (transformers 5) fuses ``experts.gate_up_proj [E, 2I, h]`` (gate rows first) and
    ``experts.down_proj [E, h, I]``; HF on disk has per-expert ``experts.{e}.{gate,up,down}_proj.weight``.
  * MTP: ours ``mtp.layers.{k}.X``; HF on disk ``model.layers.{L + k}.X`` (L = num_hidden_layers), whose
    ``embed_tokens`` / ``shared_head.head`` are duplicates of the main embedding / head and are skipped.
  * vocab rows may be padded on our side (``pad_vocab``).

DeepSeek-V4 names its MTP layers ``mtp.{k}.*`` instead (models/deepseek_v4/hf_names.py); the functions below
ask it for model_type deepseek_v4.

``hf_tensor_for(ma_name, get, cfg)`` builds the full (unsharded, unpadded) tensor for one of our names from a
getter over HF names (in-memory state dict or lazy safetensors), accepting either expert layout.
``hf_names_for(ma_name, cfg)`` lists the HF names it reads; ``ma_name_for(hf_name, cfg)`` is the inverse
(``(ma_name, expert_index or None, part)``, or None for skipped duplicates).
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

import torch

from ...config import ModelConfig

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.*)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_DUPLICATES = ("embed_tokens.weight", "shared_head.head.weight")


def _v4(cfg: ModelConfig):
    if cfg.model_type != "deepseek_v4":
        return None
    from ..deepseek_v4 import hf_names as v4
    return v4


def _hf_base(ma_name: str, cfg: ModelConfig) -> str:
    if _v4(cfg):
        return _v4(cfg).hf_base(ma_name)
    m = _MTP.match(ma_name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return ma_name


def hf_names_for(ma_name: str, cfg: ModelConfig) -> List[str]:
    base = _hf_base(ma_name, cfg)
    m = _EXPERT.match(base)
    if not m:
        return [base]
    prefix, part = m.groups()
    fused = f"{prefix}.gate_up_proj" if part in ("gate_proj", "up_proj") else f"{prefix}.down_proj"
    return [fused] + [f"{prefix}.{e}.{part}.weight" for e in range(cfg.n_routed_experts)]


def hf_tensor_for(ma_name: str, get: Callable[[str], Optional[torch.Tensor]], cfg: ModelConfig) -> torch.Tensor:
    """Full tensor for ``ma_name``; ``get(hf_name)`` returns the HF tensor or None when absent."""
    base = _hf_base(ma_name, cfg)
    m = _EXPERT.match(base)
    if not m:
        t = get(base)
        if t is None:
            raise KeyError(f"HF state dict has no {base!r} (needed for {ma_name!r})")
        return t
    prefix, part = m.groups()
    I = cfg.moe_intermediate_size
    if part in ("gate_proj", "up_proj"):
        fused = get(f"{prefix}.gate_up_proj")
        if fused is not None:
            return fused[:, :I] if part == "gate_proj" else fused[:, I:]
    else:
        fused = get(f"{prefix}.down_proj")
        if fused is not None:
            return fused
    per = [get(f"{prefix}.{e}.{part}.weight") for e in range(cfg.n_routed_experts)]
    if any(t is None for t in per):
        raise KeyError(f"HF state dict has neither fused nor per-expert tensors for {ma_name!r}")
    return torch.stack(per, 0)


def ma_name_for(hf_name: str, cfg: ModelConfig) -> Optional[Tuple[str, Optional[int], Optional[str]]]:
    """(our name, expert index or None, 'gate'|'up'|None for fused gate_up halves) for an HF name; None when
    the tensor is a duplicate we do not keep (MTP copies of the embedding / head)."""
    m = _HF_LAYER.match(hf_name)
    name = hf_name
    if _v4(cfg):
        name = _v4(cfg).ma_base(hf_name)
    elif m and int(m.group(1)) >= cfg.num_hidden_layers:
        k = int(m.group(1)) - cfg.num_hidden_layers
        if m.group(2) in _MTP_DUPLICATES:
            return None
        name = f"mtp.layers.{k}.{m.group(2)}"
    e = _HF_EXPERT.match(name)
    if e:
        return f"{e.group(1)}.{e.group(3)}", int(e.group(2)), None
    if name.endswith(".mlp.experts.gate_up_proj"):
        return name[: -len("gate_up_proj")] + "gate_proj", None, "gate_up"
    return name, None, None


VOCAB_PARAMS = frozenset({"model.embed_tokens.weight", "lm_head.weight"})  # [V_pad/tp, h], padded rows zero


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    out = t.new_zeros((padded,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out
