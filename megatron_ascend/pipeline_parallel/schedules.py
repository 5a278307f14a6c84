"""Forward/backward schedules over microbatches: no pipeline, 1F1B, interleaved 1F1B (virtual stages).

    fb = get_forward_backward_func(pp_size, vp_size)
    losses = fb(forward_step_func, data_iterator, model_chunks, num_microbatches, groups,
                forward_only=False, num_tokens=N, trace=None)

* ``forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)`` runs on every stage; the
  schedule first calls ``model_chunk.set_input_tensor(t)`` with the activation received from the previous
  stage (None on the first stage). On the last stage ``loss_func(output_tensor) -> (loss_sum, num_tokens,
  log_dict)`` (Megatron's calculate_per_token_loss form: the *sum* of per-token losses over the microbatch's
  loss mask, plus anything else that belongs to the loss, e.g. the MTP loss; the token count; what to log).
* The result is the list of per-microbatch ``log_dict`` s (detached) on the last stage, ``[]`` elsewhere.
* ``data_iterator``: one iterator, or a list with one per chunk. A single iterator is shared by the chunks so
  that every chunk sees microbatch j as the j-th item (each item is fetched once).

Loss normalisation (exact, the same at every PP / VP / DP size): the trainer passes ``num_tokens``, the loss-mask
token count of the whole global batch (summed over microbatches and all-reduced over data-parallel ranks:
``count_global_tokens``). Each microbatch's backward starts from ``loss_sum * loss_scale / num_tokens``, so the
accumulated grads are those of the mean per-token loss over the global batch: no mean of means, no rescaling
afterwards. ``num_tokens`` is needed only on ranks that hold the last stage; training without it is an error.
MoE auxiliary losses are injected inside the MoE layers' autograd and flow back from whichever stage holds them;
the schedule does not know about them.

Model chunks that offer ``no_sync()`` (the DDP wrapper) run every backward inside it except the backward of
their last microbatch, so the grad reduction can start (and overlap) only once.

Published orders reproduced here: 1F1B (Narayanan et al. 2021, PipeDream-flush): rank r runs min(p-r-1, m)
warm-up forwards, then pairs of one forward and one backward, then the remaining backwards. Interleaved
(Megatron-Core's schedule table): microbatches go in groups of N (``microbatch_group_size``, default p; the
last group takes the rest); a group runs through chunk 0, 1, ..., v-1 (forward) and v-1 down to 0 (backward);
warm-up (p-r-1)*2 + (v-1)*N forwards (capped at m v), then 1F1B, then cool-down. Megatron's rules: p <= N <= m
and the last group m % N is 0 or at least p (m not a multiple of p runs with N = m, say). Every chunk still
runs its microbatches in order, so the gradients are accumulated in the same order as without a pipeline.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from ..config import microbatch_group_problem
from .p2p import P2PCommunicator


class PipelineScheduleError(ValueError):
    """A schedule that cannot run with these sizes; the message names the values and the fix."""


# ----------------------------------------------------------------------------------------------
# helpers shared by the schedules
# ----------------------------------------------------------------------------------------------
class _SharedIterator:
    """View of one data iterator for one chunk: the chunk's j-th ``next`` returns the j-th item."""

    def __init__(self, source, cache: Dict[int, Any], counts: List[int], chunk: int):
        self.source, self.cache, self.counts, self.chunk = source, cache, counts, chunk

    def __iter__(self):
        return self

    def __next__(self):
        j = self.counts[self.chunk]
        while len(self.cache["items"]) + self.cache["dropped"] <= j:
            self.cache["items"].append(next(self.source))
        item = self.cache["items"][j - self.cache["dropped"]]
        self.counts[self.chunk] += 1
        while self.cache["items"] and min(self.counts) > self.cache["dropped"]:
            self.cache["items"].pop(0)
            self.cache["dropped"] += 1
        return item


def _per_chunk_iterators(data_iterator, num_chunks: int) -> List[Any]:
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise PipelineScheduleError(f"data_iterator is a list of {len(data_iterator)} iterators but there are "
                                        f"{num_chunks} model chunks; pass one per chunk or a single iterator")
        return list(data_iterator)
    if num_chunks == 1 or data_iterator is None:
        return [data_iterator] * num_chunks
    cache = {"items": [], "dropped": 0}
    counts = [0] * num_chunks
    return [_SharedIterator(data_iterator, cache, counts, c) for c in range(num_chunks)]


class _Runner:
    """Runs one forward or backward step of one chunk and keeps what the backward needs."""

    def __init__(self, forward_step_func, iterators, model, num_microbatches, groups, forward_only, num_tokens,
                 loss_scale, trace, is_last_stage_chunk: Callable[[int], bool]):
        self.forward_step_func = forward_step_func
        self.iterators = iterators
        self.model = model
        self.m = num_microbatches
        self.forward_only = forward_only
        self.trace = trace
        self.is_last = is_last_stage_chunk
        self.losses: List[Dict[str, Any]] = []
        self.scale = None
        if not forward_only and any(is_last_stage_chunk(c) for c in range(len(model))):
            if num_tokens is None:
                raise PipelineScheduleError(
                    "forward_backward needs num_tokens (the loss-mask token count of the whole global batch, "
                    "summed over microbatches and data-parallel ranks) on the last pipeline stage when "
                    "forward_only is False; compute it with count_global_tokens(loss_masks, groups)")
            n = float(num_tokens.item() if torch.is_tensor(num_tokens) else num_tokens)
            if not n > 0:
                raise PipelineScheduleError(f"num_tokens is {n}; the global batch must contain at least one "
                                            f"loss token (check the loss masks)")
            self.scale = float(loss_scale) / n
        self.fwd_count = [0] * len(model)
        self.bwd_count = [0] * len(model)
        self.saved = [[] for _ in model]  # per chunk FIFO of (input_tensor, output_tensor)

    def forward(self, chunk: int, input_tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        mb = self.fwd_count[chunk]
        self.fwd_count[chunk] += 1
        ctx = self.trace.step("F", mb, chunk) if self.trace is not None else nullcontext()
        with ctx:
            module = self.model[chunk]
            module.set_input_tensor(input_tensor)
            output, loss_func = self.forward_step_func(self.iterators[chunk], module)
            if self.is_last(chunk):
                loss_sum, ntok, log = loss_func(output)
                self.losses.append(_detach(log))
                output = loss_sum * self.scale if self.scale is not None else loss_sum
        if not self.forward_only:
            self.saved[chunk].append((input_tensor, output))
        return output

    def backward(self, chunk: int, output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        mb = self.bwd_count[chunk]
        self.bwd_count[chunk] += 1
        input_tensor, output = self.saved[chunk].pop(0)
        ctx = self.trace.step("B", mb, chunk) if self.trace is not None else nullcontext()
        sync = self.model[chunk].no_sync() if (mb < self.m - 1 and hasattr(self.model[chunk], "no_sync")) \
            else nullcontext()
        with ctx, sync:
            if input_tensor is not None and input_tensor.requires_grad:
                input_tensor.retain_grad()
            if output.requires_grad:
                torch.autograd.backward(output, grad_tensors=output_grad)
            elif output_grad is not None:
                raise RuntimeError(f"the output of chunk {chunk} does not require grad but a gradient arrived "
                                   f"for it; the model must not detach its output")
        if input_tensor is None:
            return None
        grad = input_tensor.grad
        return grad if grad is not None else torch.zeros_like(input_tensor)


def _detach(log):
    if isinstance(log, dict):
        return {k: _detach(v) for k, v in log.items()}
    if torch.is_tensor(log):
        return log.detach()
    return log


def _check_common(model, num_microbatches, expected_chunks: Optional[int], schedule: str):
    if not isinstance(model, (list, tuple)):
        raise PipelineScheduleError(f"model must be a list of model chunks (got {type(model).__name__}); "
                                    f"wrap a single module as [module]")
    if expected_chunks is not None and len(model) != expected_chunks:
        raise PipelineScheduleError(f"the {schedule} schedule runs {expected_chunks} model chunk(s) per rank but "
                                    f"got {len(model)}; build one chunk per virtual pipeline stage")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise PipelineScheduleError(f"num_microbatches is {num_microbatches}; it must be an integer >= 1")
    for c, chunk in enumerate(model):
        if not hasattr(chunk, "set_input_tensor"):
            raise PipelineScheduleError(f"model chunk {c} ({type(chunk).__name__}) has no set_input_tensor(tensor); "
                                        f"pipeline model chunks must accept the activation from the previous stage")


def count_global_tokens(loss_masks: Iterable[torch.Tensor], groups=None) -> torch.Tensor:
    """Sum of the loss masks of this rank's microbatches, all-reduced over the loss group (``groups.loss``: data x
    context parallel ranks): the ``num_tokens`` the schedules divide by. Call it on every rank of that group."""
    total = None
    for mask in loss_masks:  # int64 (exact; HCCL does not reduce float64): 0/1 masks summed per micro-batch
        s = mask.detach().sum(dtype=torch.float32).round().to(torch.int64)
        total = s if total is None else total + s
    if total is None:
        raise PipelineScheduleError("count_global_tokens got no loss masks; pass the masks of every microbatch")
    if groups is not None and groups.loss_size > 1:
        dist.all_reduce(total, group=groups.loss)
    return total


# ----------------------------------------------------------------------------------------------
# no pipeline: gradient accumulation over microbatches
# ----------------------------------------------------------------------------------------------
def forward_backward_no_pipelining(forward_step_func, data_iterator, model, num_microbatches, groups=None,
                                   forward_only=False, num_tokens=None, loss_scale=1.0, trace=None,
                                   tensor_shape=None, dtype=None) -> List[Dict[str, Any]]:
    _check_common(model, num_microbatches, 1, "no-pipeline")
    if trace is not None:
        trace.rank = 0
    iters = _per_chunk_iterators(data_iterator, 1)
    run = _Runner(forward_step_func, iters, model, num_microbatches, groups, forward_only, num_tokens, loss_scale,
                  trace, lambda c: True)
    for _ in range(num_microbatches):
        run.forward(0, None)
        if not forward_only:
            run.backward(0, None)
    return run.losses


# ----------------------------------------------------------------------------------------------
# 1F1B (no virtual stages)
# ----------------------------------------------------------------------------------------------
def forward_backward_1f1b(forward_step_func, data_iterator, model, num_microbatches, groups, forward_only=False,
                          num_tokens=None, loss_scale=1.0, trace=None, tensor_shape=None, dtype=None
                          ) -> List[Dict[str, Any]]:
    _check_common(model, num_microbatches, 1, "1F1B")
    p, r, m = groups.pp_size, groups.pp_rank, num_microbatches
    first, last = r == 0, r == p - 1
    if trace is not None:
        trace.rank = r
    comm = P2PCommunicator(groups, tensor_shape, dtype, requires_grad=not forward_only)
    run = _Runner(forward_step_func, _per_chunk_iterators(data_iterator, 1), model, m, groups, forward_only,
                  num_tokens, loss_scale, trace, lambda c: last)

    def fwd(inp):
        out = run.forward(0, inp)
        return None if last else out

    warmup = m if forward_only else min(p - r - 1, m)
    remaining = m - warmup
    for _ in range(warmup):
        inp = None if first else comm.recv_forward()
        comm.send_forward(fwd(inp))
    inp = comm.recv_forward() if (remaining > 0 and not first) else None
    for i in range(remaining):
        last_iter = i == remaining - 1
        out = fwd(inp)
        # one combined step: my activation goes down, the grad for my oldest microbatch comes up
        _, out_grad = comm.communicate(send_next=out, recv_next=not last)
        in_grad = run.backward(0, out_grad)
        inp, _ = comm.communicate(send_prev=None if first else in_grad, recv_prev=not (first or last_iter))
    if not forward_only:
        for _ in range(warmup):
            out_grad = None if last else comm.recv_backward()
            in_grad = run.backward(0, out_grad)
            comm.send_backward(None if first else in_grad)
    comm.finish()
    return run.losses


# ----------------------------------------------------------------------------------------------
# interleaved 1F1B (virtual pipeline stages)
# ----------------------------------------------------------------------------------------------
def schedule_table(m: int, v: int, group: int) -> List[tuple]:
    """(microbatch, chunk) of each forward virtual microbatch k (Megatron-Core's table): microbatches in groups of
    ``group``, the last group takes the rest; each group runs through chunks 0 .. v-1. Backward k runs the same
    microbatch on chunk v - 1 - chunk."""
    table = []
    for g0 in range(0, m, group):
        end = m if g0 + group >= m else g0 + group
        table += [(j, c) for c in range(v) for j in range(g0, end)]
    return table


def check_microbatch_group(m: int, p: int, group: Optional[int]) -> int:
    """The group size N (default p), after Megatron's rules (config.microbatch_group_problem)."""
    problem = microbatch_group_problem(m, p, group)
    if problem:
        raise PipelineScheduleError(problem)
    return group or p


def forward_backward_interleaved(forward_step_func, data_iterator, model, num_microbatches, groups,
                                 forward_only=False, num_tokens=None, loss_scale=1.0, trace=None,
                                 tensor_shape=None, dtype=None, microbatch_group_size=None
                                 ) -> List[Dict[str, Any]]:
    _check_common(model, num_microbatches, None, "interleaved")
    p, r, m, v = groups.pp_size, groups.pp_rank, num_microbatches, len(model)
    if v < 2:
        raise PipelineScheduleError(f"the interleaved schedule needs at least 2 model chunks per rank (got {v}); "
                                    f"use the 1F1B schedule (virtual-pipeline-model-parallel-size 1)")
    n = check_microbatch_group(m, p, microbatch_group_size)
    table = schedule_table(m, v, n)
    if trace is not None:
        trace.rank = r

    def is_first(c):
        return r == 0 and c == 0

    def is_last(c):
        return r == p - 1 and c == v - 1

    comm = P2PCommunicator(groups, tensor_shape, dtype, requires_grad=not forward_only)
    run = _Runner(forward_step_func, _per_chunk_iterators(data_iterator, v), model, m, groups, forward_only,
                  num_tokens, loss_scale, trace, is_last)
    total = m * v
    fchunk = lambda k: table[k][1]  # noqa: E731
    bchunk = lambda k: v - 1 - table[k][1]  # noqa: E731
    inputs = [[] for _ in range(v)]  # FIFO of received activations per chunk
    grads = [[] for _ in range(v)]  # FIFO of received output grads per chunk

    def fwd(k):
        c = fchunk(k)
        out = run.forward(c, None if is_first(c) else inputs[c].pop(0))
        return None if is_last(c) else out

    def bwd(k):
        c = bchunk(k)
        in_grad = run.backward(c, None if is_last(c) else grads[c].pop(0))
        return None if is_first(c) else in_grad

    def wants_input(k):  # does forward k receive an activation?
        return k < total and not is_first(fchunk(k))

    def wants_grad(k):  # does backward k receive a grad?
        return k < total and not is_last(bchunk(k))

    if forward_only:
        warmup = total
    else:
        warmup = min((p - r - 1) * 2 + (v - 1) * n, total)
    remaining = total - warmup

    if wants_input(0):
        inputs[fchunk(0)].append(comm.recv_forward())
    for k in range(warmup):
        out = fwd(k)
        recv_prev = wants_input(k + 1)
        if k == warmup - 1 and remaining > 0:  # last warm-up step also asks for the first grad
            recv_next = wants_grad(0)
            got_in, got_grad = comm.communicate(send_next=out, recv_prev=recv_prev, recv_next=recv_next)
            if recv_next:
                grads[bchunk(0)].append(got_grad)
        else:
            got_in, _ = comm.communicate(send_next=out, recv_prev=recv_prev)
        if recv_prev:
            inputs[fchunk(k + 1)].append(got_in)
    for i in range(remaining):
        kf = i + warmup
        out = fwd(kf)
        in_grad = bwd(i)
        recv_prev, recv_next = wants_input(kf + 1), wants_grad(i + 1)
        got_in, got_grad = comm.communicate(send_next=out, send_prev=in_grad, recv_prev=recv_prev,
                                            recv_next=recv_next)
        if recv_prev:
            inputs[fchunk(kf + 1)].append(got_in)
        if recv_next:
            grads[bchunk(i + 1)].append(got_grad)
    if not forward_only:
        if remaining == 0 and wants_grad(0):
            grads[bchunk(0)].append(comm.recv_backward())
        for i in range(remaining, total):
            in_grad = bwd(i)
            recv_next = wants_grad(i + 1)
            _, got_grad = comm.communicate(send_prev=in_grad, recv_next=recv_next)
            if recv_next:
                grads[bchunk(i + 1)].append(got_grad)
    comm.finish()
    return run.losses


# ----------------------------------------------------------------------------------------------
def get_forward_backward_func(pp_size: int, vp_size: Optional[int] = 1, microbatch_group_size: Optional[int] = None
                              ) -> Callable[..., List[Dict[str, Any]]]:
    """The schedule for these sizes: no pipeline (pp 1), 1F1B (vp 1) or interleaved (vp > 1; with
    ``microbatch_group_size`` N, Megatron's --microbatch-group-size-per-virtual-pipeline-stage)."""
    vp = vp_size or 1
    if pp_size < 1 or vp < 1:
        raise PipelineScheduleError(f"pipeline size {pp_size} / virtual size {vp_size} must be >= 1")
    if pp_size == 1:
        if vp > 1:
            raise PipelineScheduleError(f"virtual pipeline size {vp} needs pipeline-model-parallel-size > 1 (it is "
                                        f"1); drop --virtual-pipeline-model-parallel-size")
        return forward_backward_no_pipelining
    if vp > 1:
        if microbatch_group_size:
            return functools.partial(forward_backward_interleaved, microbatch_group_size=microbatch_group_size)
        return forward_backward_interleaved
    return forward_backward_1f1b
