"""DeepSeek-V4 rotary embedding: two tables ("main" and "compress") and partial, interleaved RoPE.

Sliding-only layers rotate with ``rope_theta`` and no scaling ("main"); CSA / HCA layers, their compressors and
the lightning indexer rotate with ``compress_rope_theta`` plus YaRN from ``config.rope_scaling`` ("compress"),
with the cos / sin attention factor forced to 1.0 (transformers' DeepseekV4Config sets ``attention_factor`` 1.0,
DeepSeek's reference applies no mscale). Only the LAST ``qk_rope_head_dim`` channels of a head are rotated,
in interleaved pairs ``(x[2i], x[2i+1])`` (the head is laid out ``[nope | rope]``).

    rope = V4Rope(config)
    tables = rope(position_ids [b, s], device)   # {"main": (cos, sin), "compress": (cos, sin)}
    cos, sin: [s, b, 1, r/2] fp32 (sequence-first, broadcast over heads)
    rope.at("compress", positions [b, n])        # tables for arbitrary positions (compressed entries)

Does not own: the MLA / V3 tables (models/deepseek/rope.py, whose YaRN formula is reused here).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from ...config import ConfigError, ModelConfig
from ..deepseek.rope import apply_rope_interleaved, inv_freq_and_attention_factor

Tables = Tuple[torch.Tensor, torch.Tensor]
KINDS = ("main", "compress")


def rope_kind(config: ModelConfig, layer_idx: int) -> str:
    """'main' for a sliding-only layer, 'compress' for a CSA / HCA layer."""
    return "compress" if compress_ratio(config, layer_idx) else "main"


def compress_ratio(config: ModelConfig, layer_idx: int) -> int:
    """The layer's compression ratio (0: sliding only). Layers past ``compress_ratios`` (e.g. the MTP block
    when the list does not cover it) are sliding only, as in the released configs (``ModelConfig.compress_ratio``
    where the config has it)."""
    own = getattr(config, "compress_ratio", None)
    if own is not None:
        return int(own(layer_idx))
    r = config.compress_ratios
    return int(r[layer_idx]) if layer_idx < len(r) else 0


class V4Rope:
    """cos / sin tables of both kinds. Not a module: it holds no parameters or checkpointed buffers."""

    def __init__(self, config: ModelConfig):
        if config.qk_rope_head_dim % 2 or config.qk_rope_head_dim > config.head_dim:
            raise ConfigError(f"qk_rope_head_dim {config.qk_rope_head_dim} must be even and at most head_dim "
                              f"{config.head_dim}")
        plain = dataclasses.replace(config, rope_scaling=None)
        self.inv_freq: Dict[str, torch.Tensor] = {"main": inv_freq_and_attention_factor(plain)[0]}
        if any(config.compress_ratios):
            if config.compress_rope_theta <= 0:
                raise ConfigError(f"compress_rope_theta is {config.compress_rope_theta} but the model has "
                                  f"compressed (CSA/HCA) layers; set it (the V4 releases use 160000)")
            comp = dataclasses.replace(config, rope_theta=float(config.compress_rope_theta))
            self.inv_freq["compress"] = inv_freq_and_attention_factor(comp)[0]  # attention factor: 1.0
        else:
            self.inv_freq["compress"] = self.inv_freq["main"]

    def at(self, kind: str, positions: torch.Tensor) -> Tables:
        """Tables for ``positions [b, n]``: cos, sin ``[n, b, 1, r/2]`` fp32."""
        inv = self.inv_freq[kind].to(positions.device)
        freqs = positions.t()[..., None].float() * inv
        return freqs.cos().unsqueeze(2), freqs.sin().unsqueeze(2)

    def __call__(self, position_ids: torch.Tensor, device=None) -> Dict[str, Tables]:
        if device is not None:
            position_ids = position_ids.to(device)
        main = self.at("main", position_ids)
        comp = main if self.inv_freq["compress"] is self.inv_freq["main"] else self.at("compress", position_ids)
        return {"main": main, "compress": comp}


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2 * cos.shape[-1]`` channels of ``x`` (interleaved pairs), keep the rest.
    ``inverse`` rotates by the negative angle (the de-rotation of the attention output). cos / sin broadcast
    against ``x[..., :r/2]`` (e.g. ``[s, b, 1, r/2]`` for ``x [s, b, n, d]``). Returns a new tensor."""
    r = 2 * cos.shape[-1]
    nope, rot = x[..., :-r], x[..., -r:]
    rot = apply_rope_interleaved(rot, cos, -sin if inverse else sin)
    return torch.cat([nope, rot], dim=-1)
