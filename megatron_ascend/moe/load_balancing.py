"""Load balancing for the MoE router: balance losses, the aux-loss-free expert bias, load statistics.

Owns:
* ``balance_loss`` -- one function for the sequence-wise loss (V3: per sequence) and the classic batch-level
  loss (Switch/Megatron ``aux_loss``: the whole micro-batch is one segment), ``z_loss``;
* ``MoEAuxLossAutoScaler`` -- attaches an aux loss to the activations: forward returns the activation
  unchanged, backward injects ``scale * loss_scale * d(aux)/d(params)``. ``set_aux_loss_scale(s, loss_scale)``
  sets both: ``scale`` normalises (1 / (num_microbatches x size of the "loss" group) when the trainer sums
  grads over micro-batches and data-parallel ranks), ``loss_scale`` is the fp16 dynamic loss scale the
  schedule multiplies the LM loss by (1.0 otherwise): the optimizer divides every gradient by it, so the aux
  losses must carry it too or they vanish under fp16 (Megatron's ``MoEAuxLossAutoScaler.set_loss_scale``).
  The trainer sets both at one place before each step; pipeline schedules need to know nothing about it.
  Every injected loss goes through here: the balance losses, the z-loss and the DSA indexer loss;
* ``update_expert_bias(model, groups, rate)`` -- after each optimizer step:
  ``b += rate * sign(mean(load) - load)`` with the loads all-reduced over the tp-dp-cp group (every rank routes
  over all E experts, so this is the global-batch count), identical on every rank;
* ``collect_load_stats(model, groups=None)`` -- per-layer max / mean tokens per expert, dropped tokens and the
  aux-loss values, for logging.

Statistics under TP: each TP rank routes a disjoint slice of the tokens (see moe_layer.py), so the counts of a
sequence (or batch) are summed over the tp group before ``f`` is formed, while ``P`` keeps this rank's token
sum only. The TP ranks' local losses then add up to the single-process loss, and so do their gradients.
Does not own: the router (router.py), the layer (moe_layer.py).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

from . import comm
from .router import TopKRouter


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """forward(output, aux_loss, scale) -> output; backward gives aux_loss the gradient ``scale`` (or the class
    value ``MoEAuxLossAutoScaler.scale`` when ``scale`` is None) times the class value ``loss_scale``, both read
    at backward time."""

    scale: float = 1.0
    loss_scale: float = 1.0

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: Optional[float] = None):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.scale if ctx.scale is None else ctx.scale
        return grad_output, torch.full_like(aux_loss, scale * MoEAuxLossAutoScaler.loss_scale), None


def set_aux_loss_scale(scale: float, loss_scale: float = 1.0) -> None:
    """Gradient scale of every attached aux loss (e.g. 1 / (micro-batches x loss-group size)) and the loss
    scale the LM loss is multiplied by this step (fp16; 1.0 otherwise). The trainer sets both before each step."""
    if not loss_scale > 0:
        raise ValueError(f"loss_scale {loss_scale} must be > 0 (the fp16 dynamic loss scale, 1.0 without one)")
    MoEAuxLossAutoScaler.scale = float(scale)
    MoEAuxLossAutoScaler.loss_scale = float(loss_scale)


def attach_aux_loss(output: torch.Tensor, aux_loss: Optional[torch.Tensor], scale: Optional[float] = None
                    ) -> torch.Tensor:
    if aux_loss is None or not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return output
    return MoEAuxLossAutoScaler.apply(output, aux_loss, scale)


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass, i.e. when an activation-checkpointed forward is recomputed:
    the MoE layer then skips its side effects (bias counts, logged values) so they are not counted twice."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def balance_loss(scores: torch.Tensor, idx: torch.Tensor, seg_ids: torch.Tensor, n_segs: int, seg_len: int,
                 alpha: float, tp_group=None) -> torch.Tensor:
    """alpha * mean_seg sum_e f[seg, e] * P[seg, e] for this rank's share of the tokens.

    scores [n, E] router scores (grad), idx [n, K] chosen experts, seg_ids [n] segment of each local token,
    seg_len tokens per segment over the whole tp group.
    f[seg, e] = E / (K * seg_len) * count(e chosen in seg)   (counts summed over tp_group)
    P[seg, e] = (1 / seg_len) * sum_t s'[t, e],  s' = s / sum_e s  (this rank's tokens only)
    """
    n, e = scores.shape
    k = idx.shape[1]
    counts = scores.new_zeros(n_segs, e)
    counts.index_put_((seg_ids.repeat_interleave(k), idx.reshape(-1)), scores.new_ones(n * k).detach(),
                      accumulate=True)
    counts = comm.all_reduce_no_grad(counts, tp_group)
    f = counts * (e / (k * seg_len))
    s_norm = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    p_sum = scores.new_zeros(n_segs, e).index_add(0, seg_ids, s_norm)
    return alpha * (f * p_sum).sum() / (seg_len * n_segs)


def z_loss(logits: torch.Tensor, coeff: float, total_tokens: int) -> torch.Tensor:
    """coeff * mean_t logsumexp(logits_t)^2 (the mean over the tp group's tokens; this rank's part)."""
    return coeff * torch.logsumexp(logits, dim=-1).square().sum() / max(total_tokens, 1)


# ---- model-level helpers ------------------------------------------------------------------------------
def _routers(model: Union[nn.Module, Iterable[nn.Module]]) -> List[TopKRouter]:
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    out = []
    for chunk in chunks:
        out.extend(m for m in chunk.modules() if isinstance(m, TopKRouter))
    return sorted(out, key=lambda r: r.layer_idx)


@torch.no_grad()
def update_expert_bias(model, groups, rate: float) -> None:
    """b += rate * sign(mean_e(load) - load_e) per layer, loads = counts since the last call summed over the
    tp-dp-cp group (all micro-batches, all data-parallel and tensor-parallel ranks); then zero the counts.
    Call once per optimizer step on every rank of the stage (a collective when groups is given)."""
    routers = _routers(model)
    if not routers:
        return
    # int64 over the group: exact (each rank's fp32 counts are integers below 2**24 per step)
    counts = torch.stack([r.local_tokens_per_expert.to(torch.int64) for r in routers])
    if groups is not None:
        counts = comm.all_reduce_no_grad(counts, groups.tp_dp_cp)
    counts = counts.to(torch.float32)
    mean = counts.mean(dim=-1, keepdim=True)
    step = torch.sign(mean - counts) * rate
    for r, st in zip(routers, step):
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.add_(st.to(r.e_score_correction_bias))
        r.local_tokens_per_expert.zero_()


@torch.no_grad()
def collect_load_stats(model, groups=None, reset: bool = True) -> Dict[str, float]:
    """Per MoE layer: ``moe/layer_{i}/max_tokens``, ``mean_tokens``, ``max_over_mean`` (tokens per expert),
    ``dropped_tokens`` and each aux-loss value (mean per forward; TP parts summed, averaged over data
    parallel). With ``groups`` the numbers cover the tp-dp-cp group (a collective); without, this rank."""
    routers = _routers(model)
    out: Dict[str, float] = {}
    if not routers:
        return out
    names = sorted({k for r in routers for k in getattr(r, "aux_values", {})})
    rows = []
    for r in routers:
        aux = getattr(r, "aux_values", {})
        calls = max(getattr(r, "aux_calls", 0), 1)
        st = r.stat_tokens_per_expert
        vals = [aux[n].to(st) / calls if n in aux else st.new_zeros(()) for n in names]
        rows.append(torch.cat([st, r.stat_dropped.to(st).view(1)] + [v.view(1) for v in vals]))
    # in the router's statistics dtype on the device: fp32 (HCCL does not reduce float64; float64 only in the
    # float64 CPU tests). Counts are integers, exact below 2**24 per expert and step; the aux values are logged
    # only (relative rounding <= group size * 2**-24)
    table = torch.stack(rows)
    dp = 1
    if groups is not None:
        table = comm.all_reduce_no_grad(table, groups.tp_dp_cp)
        dp = groups.size("dp_cp")
    for r, row in zip(routers, table.tolist()):  # one device-to-host read for every layer
        e = r.num_experts
        tok = row[:e]
        p = f"moe/layer_{r.layer_idx}/"
        mean = sum(tok) / e
        out[p + "max_tokens"] = max(tok)
        out[p + "mean_tokens"] = mean
        out[p + "max_over_mean"] = max(tok) / mean if mean > 0 else 0.0
        out[p + "dropped_tokens"] = row[e]
        for j, n in enumerate(names):
            out[p + n] = row[e + 1 + j] / dp
        if reset:
            r.stat_tokens_per_expert.zero_()
            r.stat_dropped.zero_()
            r.aux_values = {}
            r.aux_calls = 0
    return out
