"""Does a checkpoint fit the run that loads it? The model's tensors and the learning-rate schedule, compared
before any tensor is read, each mismatch one CheckpointError line naming the values and the fix.

* model: the model tensors the checkpoint stores must be exactly the tensors this run's model holds (the union
  over all ranks), with the same global shapes. A 2-layer checkpoint into ``--num-layers 1`` or an MTP
  checkpoint into ``--mtp-num-layers 0`` (tensors the model would silently drop, with their optimizer state)
  is refused like a missing tensor; the message lists the recorded model-config fields that differ and the
  flags that set them. Finetuning (``--finetune``, converted weights, tools/forward.py) may leave out the MTP
  layers on purpose: a warning. Differences in fields that change no tensor (e.g. ``rope_theta``, the aux-loss
  coefficient) are returned as warnings.
* schedule: the checkpoint's OptimizerParamScheduler settings against this run's. Like Megatron, a difference
  is refused unless ``--override-opt_param-scheduler`` (keep this run's flags) or
  ``--use-checkpoint-opt_param-scheduler`` (continue on the checkpoint's) says which to use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from .errors import CheckpointError

# ModelConfig field -> the flag that sets it (arguments.py's names; the HF key is the field itself)
_FLAG_OF = {
    "num_hidden_layers": "--num-layers", "hidden_size": "--hidden-size", "intermediate_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads", "q_lora_rank": "--q-lora-rank", "kv_lora_rank": "--kv-lora-rank",
    "qk_nope_head_dim": "--qk-head-dim", "qk_rope_head_dim": "--qk-pos-emb-head-dim", "v_head_dim": "--v-head-dim",
    "n_routed_experts": "--num-experts", "moe_intermediate_size": "--moe-ffn-hidden-size",
    "n_shared_experts": "--n-shared-experts", "num_experts_per_tok": "--moe-router-topk",
    "first_k_dense_replace": "--first-k-dense-replace", "moe_layer_freq": "--moe-layer-freq",
    "num_nextn_predict_layers": "--mtp-num-layers", "vocab_size": "--vocab-size",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights", "model_type": "--model-type",
    "index_n_heads": "--index-n-heads", "index_head_dim": "--index-head-dim", "index_topk": "--index-topk",
    "rope_theta": "--rotary-base", "rms_norm_eps": "--norm-epsilon", "aux_loss_alpha": "--moe-aux-loss-coeff",
    "routed_scaling_factor": "--moe-router-topk-scaling-factor", "scoring_func": "--moe-router-score-function",
    "topk_method": "--moe-router-topk-method", "n_group": "--moe-router-num-groups",
    "topk_group": "--moe-router-group-topk", "mtp_loss_scaling_factor": "--mtp-loss-scaling-factor",
    "max_position_embeddings": "--max-position-embeddings",
}
_IGNORED = {"init_method_std"}  # changes nothing once weights exist


def _plain(x):
    """As it reads back from common.json: tuples are lists."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _as_dict(cfg) -> Optional[Dict[str, Any]]:
    if cfg is None:
        return None
    return _plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))


def config_diff(saved: Optional[Dict[str, Any]], current) -> List[Tuple[str, Any, Any]]:
    """[(field, checkpoint value, this run's value)] of the model-config fields that differ."""
    cur = _as_dict(current)
    if not saved or cur is None:
        return []
    out = []
    for k in sorted(set(saved) | set(cur)):
        if k in _IGNORED:
            continue
        a, b = _plain(saved.get(k)), cur.get(k)
        if a != b:
            out.append((k, a, b))
    return out


def _describe(diff) -> str:
    return ", ".join(f"{k} {a} (checkpoint) vs {b} (this run)" for k, a, b in diff)


def _fix(diff) -> str:
    flags = [f"{_FLAG_OF[k]} {a}" for k, a, _ in diff if k in _FLAG_OF and not isinstance(a, (bool, dict, list))]
    return (f"pass the checkpoint's model flags ({' '.join(flags)})" if flags
            else "pass the model flags the checkpoint was saved with") + \
        " or point --load at a checkpoint of this model"


def union_over_ranks(local: Dict[str, Tuple[int, ...]], group=None) -> Dict[str, Tuple[int, ...]]:
    if not (dist.is_available() and dist.is_initialized()):
        return dict(local)
    parts: List[Optional[Dict[str, Tuple[int, ...]]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    out: Dict[str, Tuple[int, ...]] = {}
    for p in parts:
        out.update(p or {})
    return out


def check_model(path: str, stored: Dict[str, Tuple[int, ...]], model: Dict[str, Tuple[int, ...]],
                saved_cfg: Optional[Dict[str, Any]], current_cfg, droppable: Tuple[str, ...] = ()) -> List[str]:
    """Raise one CheckpointError when the stored model tensors (name -> global shape, optimizer / rng keys
    excluded) differ from the model's (the union over ranks); else return warnings for config fields that
    differ without changing any tensor. ``droppable``: name prefixes of stored tensors the caller leaves out
    on purpose (finetuning without the MTP layers: ``("mtp.",)``), reported as a warning."""
    missing = sorted(k for k in model if k not in stored)
    extra = sorted(k for k in stored if k not in model)
    dropped = [k for k in extra if k.startswith(tuple(droppable))] if droppable else []
    extra = [k for k in extra if k not in dropped]
    wrong = sorted(f"{k} {tuple(stored[k])} vs {tuple(model[k])}" for k in model
                   if k in stored and tuple(stored[k]) != tuple(model[k]))
    diff = config_diff(saved_cfg, current_cfg)
    if missing or extra or wrong:
        parts = []
        if diff:
            parts.append(_describe(diff))
        if extra:
            parts.append(f"{len(extra)} checkpoint tensor(s) this model lacks, e.g. {', '.join(extra[:3])}")
        if missing:
            parts.append(f"{len(missing)} model tensor(s) the checkpoint lacks, e.g. {', '.join(missing[:3])}")
        if wrong:
            parts.append(f"{len(wrong)} with another global shape (checkpoint vs model), e.g. {'; '.join(wrong[:2])}")
        raise CheckpointError(f"checkpoint {path} was saved for another model: {'; '.join(parts)}; {_fix(diff)}")
    out = []
    if dropped:
        out.append(f"checkpoint {path}: not loading its {len(dropped)} tensor(s) under "
                   f"{', '.join(sorted(set(p for p in droppable if any(k.startswith(p) for k in dropped))))} "
                   f"(this model has none; finetuning)")
        diff = [d for d in diff if d[0] != "num_nextn_predict_layers"]
    if diff:
        out.append(f"checkpoint {path} was saved with {_describe(diff)}; continuing with this run's values")
    return out


def check_schedule(path: str, changed: List[str], override: bool, use_checkpoint: bool) -> Optional[str]:
    """``changed``: the scheduler's 'name: checkpoint -> this run' list. Raise unless a flag says which wins;
    return the warning to log when one does."""
    if not changed:
        return None
    what = "; ".join(changed)
    if use_checkpoint:
        return f"checkpoint {path}: continuing on its learning-rate schedule ({what}) (--use-checkpoint-opt_param-scheduler)"
    if override:
        return f"checkpoint {path}: using this run's learning-rate schedule ({what}) (--override-opt_param-scheduler)"
    raise CheckpointError(f"checkpoint {path} was saved with another learning-rate schedule ({what}, checkpoint -> "
                          f"this run); pass the checkpoint's schedule flags, or --override-opt_param-scheduler to use "
                          f"this run's, or --use-checkpoint-opt_param-scheduler to continue on the checkpoint's")
