"""Where DeepSeek-V4's HF names differ from V2 / V3's (models/deepseek/hf_names.py maps everything else and
asks this module for V4 configs).

Our names equal the canonical HF names -- transformers' DeepseekV4ForCausalLM in-memory names, which
checkpointing's V4 reader produces from every on-disk naming (transformers' save_pretrained names, DeepSeek's
original names, FP8 / FP4) -- except:
  * grouped experts (as for V3): ours ``...mlp.experts.{gate_proj,up_proj}`` ``[E, I, h]`` / ``down_proj``
    ``[E, h, I]``; HF either fused (``experts.gate_up_proj [E, 2I, h]``, gate rows first; ``experts.down_proj``)
    or per expert (``experts.{e}.{gate,up,down}_proj.weight``, what we export: one expert in memory at a time);
  * MTP (transformers builds none and ignores ``mtp.*``): ours ``mtp.layers.{k}.X``, HF ``mtp.{k}.X`` with the same
    X as a decoder layer's (``self_attn.q_a_proj.weight``, ``mlp.experts.{e}.gate_proj.weight``, ``attn_hc.fn``,
    ...) plus ``e_proj`` / ``h_proj`` / ``enorm`` / ``hnorm`` / ``norm`` ``.weight`` and
    ``hc_head.{hc_fn,hc_base,hc_scale}`` (DeepSeek's original checkpoints call the block ``mtp.{k}.`` too);
    there are no duplicated embedding / head tensors;
  * vocab rows may be padded on our side (models/deepseek/hf_names.pad_vocab).
The hash layers' ``mlp.gate.tid2eid`` (int64 buffer) keeps its name and dtype.
"""
from __future__ import annotations

import re

_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.*)$")
_HF_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def hf_base(ma_name: str) -> str:
    """Our name -> the HF name before any expert splitting (``mtp.layers.k.X`` -> ``mtp.k.X``)."""
    m = _MTP.match(ma_name)
    return f"mtp.{m.group(1)}.{m.group(2)}" if m else ma_name


def ma_base(hf_name: str) -> str:
    """The inverse of hf_base."""
    m = _HF_MTP.match(hf_name)
    return f"mtp.layers.{m.group(1)}.{m.group(2)}" if m else hf_name
