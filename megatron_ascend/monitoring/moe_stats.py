"""MoE load statistics: per-layer tokens-per-expert imbalance for the log and TensorBoard.

Input: ``{layer_idx: tokens_per_expert}`` (a 1-D tensor or list with one count per routed expert, summed over the
iterations since the last call) as moe.collect_load_stats returns after the caller has reduced it over ranks.
Output scalars follow Megatron's ``moe/{name}_layer_{i}`` naming:
``moe/tokens_per_expert_imbalance_layer_{i}`` = max / mean tokens per expert (1.0 is perfectly balanced) and
``moe/tokens_per_expert_cv_layer_{i}`` = std / mean.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch


def load_imbalance_scalars(stats: Mapping[int, object]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    worst = 0.0
    for layer, counts in sorted(stats.items()):
        c = torch.as_tensor(counts, dtype=torch.float64).flatten()
        if c.numel() == 0 or float(c.sum()) <= 0:
            continue
        mean = float(c.mean())
        imb = float(c.max()) / mean
        out[f"moe/tokens_per_expert_imbalance_layer_{layer}"] = imb
        out[f"moe/tokens_per_expert_cv_layer_{layer}"] = float(c.std(unbiased=False)) / mean
        worst = max(worst, imb)
    if out:
        out["moe/tokens_per_expert_imbalance_max"] = worst
    return out
