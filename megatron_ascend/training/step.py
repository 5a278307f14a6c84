"""One training / evaluation step: the forward_step_func handed to the pipeline schedule, the loss function,
and the reduction of the logged losses.

Loss normalisation (ARCHITECTURE.md): the model returns per-token losses; ``loss_func`` returns the masked sum
and the token count of one micro-batch; the trainer divides by the token count of the whole global batch.
The global count is known before the step: every rank prefetches its ``num_microbatches`` micro-batches
(all stages read the same batches), sums the loss masks and all-reduces the count over the data-parallel
group. The schedule back-propagates ``loss_sum / global_tokens`` per micro-batch and the DDP wrapper sums grads
over DP, so the gradient equals the single-process gradient of the mean loss over all tokens of the global
batch at every PP / DP size.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

MODEL_INPUT_KEYS = {"tokens": "input_ids", "position_ids": "position_ids", "labels": "labels",
                    "loss_mask": "loss_mask", "segment_ids": "segment_ids"}


def prefetch(data_iterator: Iterator[dict], n: int, device: torch.device) -> List[dict]:
    """The next ``n`` micro-batches, moved to ``device``."""
    out = []
    for _ in range(n):
        batch = next(data_iterator)
        out.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def global_token_count(batches: Sequence[dict], dp_group) -> torch.Tensor:
    """Loss-mask tokens of the global batch (this rank's micro-batches all-reduced over data parallel)."""
    n = torch.zeros((), dtype=torch.float64)
    for b in batches:
        n += b["loss_mask"].detach().double().sum().cpu()
    if dp_group is not None and dist.is_initialized():
        dist.all_reduce(n, group=dp_group)
    return n


def _loss_tensors(output) -> Dict[str, torch.Tensor]:
    """Normalise the model's post-process output to {name: per-token loss [b, s]}.

    Accepts a tensor (the LM loss) or a dict with 'lm loss' / 'lm_loss' / 'loss' and optional MTP entries
    ('mtp_1 loss', 'mtp_losses' list, ...)."""
    if torch.is_tensor(output):
        return {"lm loss": output}
    out: Dict[str, torch.Tensor] = {}
    for k, v in output.items():
        if k in ("lm loss", "lm_loss", "loss", "lm"):
            out["lm loss"] = v
        elif k in ("mtp_losses", "mtp") and isinstance(v, (list, tuple)):
            for i, t in enumerate(v):
                out[f"mtp_{i + 1} loss"] = t
        elif k.startswith("mtp") and torch.is_tensor(v):
            name = k if k.endswith(" loss") else k.replace("_loss", "") + " loss"
            out[name] = v
    if "lm loss" not in out:
        raise KeyError(f"model output has no LM loss (keys {sorted(output)}); expected 'lm_loss' or 'loss'")
    return out


def make_loss_func(loss_mask: torch.Tensor, mtp_scale: float, mtp_in_graph: bool) -> Callable:
    """loss_func(output) -> (masked loss sum to back-propagate, num_tokens, {name: masked loss sum (detached)}).

    The schedule divides the first value by the global token count it is given (``num_tokens``). MTP
    per-token losses, when the model does not already add them to the graph itself (``mtp_in_graph``), are
    added with weight ``mtp_scale`` = lambda / D, as DeepSeek-V3 defines L_MTP."""
    mask = loss_mask.float()

    def loss_func(output):
        losses = _loss_tensors(output)
        log = {}
        total = None
        for name, per_token in losses.items():
            s = (per_token.float() * mask).sum()
            log[name] = s.detach()
            if name == "lm loss":
                total = s if total is None else total + s
            elif not mtp_in_graph:
                total = s * mtp_scale if total is None else total + s * mtp_scale
        return total, mask.sum().detach(), log

    return loss_func


class ForwardStep:
    """forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)."""

    def __init__(self, mtp_scale: float, mtp_in_graph: bool, call_model: Callable):
        self.mtp_scale, self.mtp_in_graph, self.call_model = mtp_scale, mtp_in_graph, call_model

    def __call__(self, data_iterator, model_chunk):
        batch = next(data_iterator)
        output = self.call_model(model_chunk, batch)
        return output, make_loss_func(batch["loss_mask"], self.mtp_scale, self.mtp_in_graph)


def reduce_logged_losses(results, global_tokens: torch.Tensor, dp_group, pp_group, last_stage: bool,
                         pp_last_rank: int) -> Dict[str, float]:
    """Sum the per-micro-batch logged loss sums, all-reduce over DP, divide by the global token count, and
    broadcast from the last pipeline stage so every rank logs the same numbers."""
    sums: Dict[str, torch.Tensor] = {}
    names: List[str] = []
    if last_stage:
        for r in results or []:
            log = r[2] if isinstance(r, (tuple, list)) and len(r) >= 3 else r
            for k, v in log.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.detach().double().cpu()
        names = sorted(sums)
    if dist.is_initialized() and pp_group is not None and dist.get_world_size(pp_group) > 1:
        obj = [names]
        dist.broadcast_object_list(obj, src=pp_last_rank, group=pp_group)
        names = obj[0]
    vec = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64)) for k in names]) if names else \
        torch.zeros(0, dtype=torch.float64)
    if dist.is_initialized() and names:
        if last_stage and dp_group is not None:
            dist.all_reduce(vec, group=dp_group)
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.broadcast(vec, src=pp_last_rank, group=pp_group)
    denom = max(float(global_tokens), 1.0)
    return {k: float(vec[i]) / denom for i, k in enumerate(names)}
