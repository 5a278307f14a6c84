"""One training / evaluation step: the forward_step_func handed to the pipeline schedule, the loss function,
and the reduction of the logged losses.

Loss normalisation (ARCHITECTURE.md): the model returns per-token losses; ``loss_func`` returns the masked sum
and the token count of one micro-batch; the trainer divides by the token count of the whole global batch.
The global count is known before the step: every rank prefetches its ``num_microbatches`` micro-batches
(all stages read the same batches), sums the loss masks and all-reduces the count over the loss group
(``groups.loss``, parallel_state.LOSS_GROUP). The schedule back-propagates ``loss_sum / global_tokens`` per
micro-batch and the DDP wrapper sums dense grads over the same loss group, so the gradient equals the
single-process gradient of the mean loss over all tokens of the global batch at every PP / DP size.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist

from ..platform import get_platform



def prefetch(data_iterator: Iterator[dict], n: int, device: torch.device) -> List[dict]:
    """The next ``n`` micro-batches, moved to ``device``."""
    out = []
    for _ in range(n):
        batch = next(data_iterator)
        out.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()})
    return out


def global_token_count(batches: Sequence[dict], loss_group) -> torch.Tensor:
    """Loss-mask tokens of the global batch: this rank's micro-batches, all-reduced over the loss group
    (``groups.loss``), as an int64 tensor on the batches' device. Exact: each micro-batch's 0/1 mask is summed in
    fp32 (exact below 2**24 tokens per micro-batch) and rounded to an integer, and the sum over micro-batches and
    ranks is int64 (HCCL does not reduce float64; NCCL / HCCL reduce device tensors only). Every dataset here
    builds 0/1 masks; a fractional mask would be counted to the nearest token per micro-batch."""
    dev = batches[0]["loss_mask"].device if batches else get_platform().device()
    n = torch.zeros((), dtype=torch.int64, device=dev)
    for b in batches:
        n += b["loss_mask"].detach().sum(dtype=torch.float32).round().to(torch.int64)
    if loss_group is not None and dist.is_initialized():
        dist.all_reduce(n, group=loss_group)
    return n


COUNT_SUFFIX = "/__count"  # a logged "<name>/__count" entry is the token count that divides "<name>"


def make_loss_func(loss_mask: torch.Tensor, mtp_scale: float) -> Callable:
    """loss_func(output) -> (masked loss sum to back-propagate, num_tokens, {name: detached sums}).

    ``output`` is the model's last-stage dict (``lm_loss [b, s]`` unmasked per-token, ``mtp_losses`` per depth
    already masked, ``mtp_loss_masks``, ``mtp_loss_scale`` = lambda / D) or a per-token loss tensor. The
    back-propagated sum is ``sum(lm_loss * mask) + lambda/D * sum_k sum(mtp_losses[k])`` (DeepSeek-V3's L_MTP,
    normalised by the schedule with the same global LM token count as the LM loss, as the model's contract
    says). The log holds each loss sum and, for MTP, its own token count so that the logged ``mtp_k loss`` is
    the mean over the tokens that have a k-th next token."""
    mask = loss_mask.float()

    def loss_func(output):
        lm = output if torch.is_tensor(output) else output["lm_loss"]
        lm_sum = (lm.float() * mask).sum()
        log = {"lm loss": lm_sum.detach()}
        total = lm_sum
        if not torch.is_tensor(output):
            scale = output.get("mtp_loss_scale", mtp_scale)
            masks = output.get("mtp_loss_masks") or []
            for k, per_token in enumerate(output.get("mtp_losses") or []):
                s = per_token.float().sum()
                total = total + scale * s
                log[f"mtp_{k + 1} loss"] = s.detach()
                if k < len(masks):
                    log[f"mtp_{k + 1} loss" + COUNT_SUFFIX] = masks[k].float().sum().detach()
        return total, mask.sum().detach(), log

    return loss_func


class ForwardStep:
    """forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)."""

    def __init__(self, mtp_scale: float, call_model: Callable):
        self.mtp_scale, self.call_model = mtp_scale, call_model

    def __call__(self, data_iterator, model_chunk):
        batch = next(data_iterator)
        output = self.call_model(model_chunk, batch)
        return output, make_loss_func(batch["loss_mask"], self.mtp_scale)


def reduce_logged_losses(results, global_tokens: torch.Tensor, loss_group, pp_group, holds_loss: bool,
                         loss_src_rank: int) -> Dict[str, float]:
    """Sum the per-micro-batch logged sums, all-reduce over the loss group, divide by the global LM token count (or
    by the entry's own ``/__count``), and broadcast from the rank of the pipeline stage that computes the loss
    (``loss_src_rank``, from the placement) so every rank logs the same numbers.

    The sums stay on the device in fp32 (the loss function produced them in fp32; HCCL does not reduce float64)
    and come to the host once, as one list: a logged value's relative rounding is at most
    (num_microbatches + loss group size) * 2**-24 beyond the fp32 of its terms -- logging only, no gradient
    depends on it."""
    dev = get_platform().device()
    sums: Dict[str, torch.Tensor] = {}
    names: List[str] = []
    if holds_loss:
        for log in results or []:
            for k, v in log.items():
                if torch.is_tensor(v):
                    v = v.detach().to(dev, torch.float32)
                    sums[k] = sums[k] + v if k in sums else v
        names = sorted(sums)
    if dist.is_initialized() and pp_group is not None and dist.get_world_size(pp_group) > 1:
        obj = [names]
        dist.broadcast_object_list(obj, src=loss_src_rank, group=pp_group)
        names = obj[0]
    vec = torch.stack([sums[k] if k in sums else torch.zeros((), device=dev) for k in names]) if names else \
        torch.zeros(0, device=dev)
    if dist.is_initialized() and names:
        if holds_loss and loss_group is not None:
            dist.all_reduce(vec, group=loss_group)
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.broadcast(vec, src=loss_src_rank, group=pp_group)
    values = dict(zip(names, vec.tolist()))  # one device-to-host read
    denom = max(float(global_tokens), 1.0)
    out = {}
    for k, v in values.items():
        if k.endswith(COUNT_SUFFIX):
            continue
        out[k] = v / max(values.get(k + COUNT_SUFFIX, denom), 1.0)
    return out
