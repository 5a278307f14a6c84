"""In-memory HuggingFace interop: ModelConfig from a ``transformers`` config object, and loading an HF state
dict (``hf_model.state_dict()``, or any name -> tensor mapping) into a (possibly sharded) model of ours.

The on-disk converter (checkpointing/) reuses ``hf_names``; this module only knows live tensors.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from ...config import ModelConfig
from ...tensor_parallel.utils import shard_of
from .hf_names import VOCAB_PARAMS, hf_tensor_for, pad_vocab


def model_config_for_hf(hf_config, **overrides) -> ModelConfig:
    """ModelConfig from a transformers DeepseekV2/V3/V32/V4 config (keys that are None mean 'default')."""
    raw = hf_config.to_dict()
    d = {k: v for k, v in raw.items() if v is not None}
    if "q_lora_rank" in raw and raw["q_lora_rank"] is None:
        d["q_lora_rank"] = 0  # the V2-Lite form (ModelConfig turns 0 into None)
    if d.get("model_type") == "deepseek_v2" and "scoring_func" not in d:
        d["scoring_func"] = "softmax"
    return ModelConfig.from_hf_dict(d, **overrides)


@torch.no_grad()
def load_hf_state_dict_into(model, hf_state_dict: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Copy HF tensors into ``model`` (a DeepseekForCausalLM chunk), slicing each to this rank's shard by the
    parameter's ShardSpec (TP / EP) and padding vocab rows. Returns (our names not found, HF names unused)."""
    cfg: ModelConfig = model.config
    used = set()

    def get(name):
        t = hf_state_dict.get(name)
        if t is not None:
            used.add(name)
        return t

    missing = []
    targets: Dict[str, torch.Tensor] = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "gate.tid2eid")):
            targets[name] = buf
    for name, p in targets.items():
        try:
            full = hf_tensor_for(name, get, cfg)
        except KeyError:
            missing.append(name)
            continue
        if name in VOCAB_PARAMS:
            full = pad_vocab(full, model.padded_vocab_size)
        p.copy_(shard_of(full.to(p.dtype), p))
    if getattr(model, "lm_head", None) is not None and cfg.tie_word_embeddings:
        used.add("lm_head.weight")
    unused = sorted(set(hf_state_dict) - used)
    return missing, unused
