"""Weight gradients written straight into ``param.main_grad`` (Megatron's gradient-accumulation fusion).

Without fusion a linear layer's backward computes ``dW = dY^T X`` into a fresh tensor, autograd hands it to
the DDP hook, and the hook adds it into the flat grad buffer (``main_grad.add_(grad)``), which was zero-filled
before the step: one GEMM output, one extra read-add-write of every weight and one buffer fill per step.
With fusion the GEMM writes its result into ``main_grad`` itself: ``mm(..., out=main_grad)`` on the first
write of a step, ``main_grad.addmm_(...)`` after that (further micro-batches, a weight used twice).

Protocol (the DDP wrapper, distributed/ddp.py, is the other side):

* ``mark_wgrad_fusable(p)`` -- set by a *layer* on a weight it only ever uses through ``linear`` /
  ``embedding`` / ``grouped_linear`` here (the word embedding too: tied to the output head or shared with MTP,
  every use is one of these). A weight also used another way must not be marked: its other gradient would
  arrive through autograd and be discarded.
* ``p.fuse_wgrad`` -- set by the DDP wrapper (``gradient_accumulation_fusion=True``, the default, as in
  Megatron; ``--no-gradient-accumulation-fusion`` turns it off) on marked params that have a ``main_grad``.
* ``p.main_grad_stale`` -- set by the DDP wrapper's ``zero_grad_buffer`` instead of zero-filling: the next
  write overwrites (``copy_`` / ``mm(out=)``), later writes accumulate; whatever is still stale when the
  reduction starts is zeroed then (params that got no gradient this step).
* ``p.grad_added_to_main_grad`` -- set by a fused backward, which returns an uninitialised placeholder as the
  weight's autograd gradient so that the post-accumulate-grad hook (bucket readiness for overlapped
  reduction) still fires; the hook sees the flag, drops the placeholder and clears the flag.
* A fused autograd function keeps the *parameter object* for its backward (``keep_weight`` / ``kept_weight``),
  never through ``save_for_backward``: under activation recompute (torch's non-reentrant checkpoint, and the
  saved-tensor hooks of ``checkpoint_discard_output``) a saved tensor comes back as a detached alias rebuilt by
  the recomputation, which carries none of the parameter's attributes (``main_grad``, ``fuse_wgrad``, the
  flags above). A parameter is a leaf that outlives the step, so holding it costs no memory; every recompute
  mode then writes into the same ``main_grad`` as the plain forward.

Mixed precision: when ``main_grad``'s dtype differs from the activations' (bf16 weights, fp32 grad buffer) the
GEMM runs in the activation dtype and is then added (no out= across dtypes on CPU); the fused fp32 GEMM
accumulation of Megatron's CUDA kernel / torch_npu is a kernel-table entry for later.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..platform import kernels


def mark_wgrad_fusable(p: torch.nn.Parameter) -> torch.nn.Parameter:
    p.wgrad_fusable = True
    return p


def fuses(p: torch.Tensor) -> bool:
    """True when ``p``'s weight gradient is to be written into ``p.main_grad`` directly."""
    return bool(getattr(p, "fuse_wgrad", False)) and getattr(p, "main_grad", None) is not None


def accumulate_main_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """``main_grad (+)= g`` (overwrite when stale): the DDP hook's path for autograd-produced grads."""
    if getattr(p, "main_grad_stale", False):
        p.main_grad.copy_(g)
        p.main_grad_stale = False
    else:
        p.main_grad.add_(g)


def zero_if_stale(p: torch.Tensor) -> None:
    if getattr(p, "main_grad_stale", False):
        p.main_grad.zero_()
        p.main_grad_stale = False


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool) -> None:
    """dst (+)= a @ b."""
    if dst.dtype != a.dtype:
        r = torch.mm(a, b)
        dst.copy_(r) if overwrite else dst.add_(r)
    elif overwrite:
        torch.mm(a, b, out=dst)
    else:
        dst.addmm_(a, b)


def keep_weight(ctx, weight: torch.Tensor) -> None:
    """Hold ``weight`` (the parameter itself) for the backward; see the module docstring for why not
    ``save_for_backward``."""
    ctx.kept_weight = weight


def kept_weight(ctx) -> torch.Tensor:
    return ctx.kept_weight


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    p.grad_added_to_main_grad = True
    return torch.empty(p.shape, dtype=p.dtype, device=p.device)


class _LinearWgradFused(torch.autograd.Function):
    """y = x W^T (+ b); backward writes dW = dY^T X into W.main_grad."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        keep_weight(ctx, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (x,), weight = ctx.saved_tensors, kept_weight(ctx)
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        stale = bool(getattr(weight, "main_grad_stale", False))
        _mm_into(weight.main_grad, dy2.t(), x2, stale)
        weight.main_grad_stale = False
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, _placeholder(weight), db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` whose weight gradient goes straight into ``weight.main_grad`` when fusion is on for it."""
    if fuses(weight) and weight.requires_grad and torch.is_grad_enabled():
        return _LinearWgradFused.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters, names and init) using ``linear`` above."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mark_wgrad_fusable(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _EmbeddingWgradFused(torch.autograd.Function):
    """F.embedding whose backward adds the rows of dY into W.main_grad (index_add_; zeroed first when stale),
    instead of building a zero-filled [V, h] gradient and copying it in."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        keep_weight(ctx, weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, dy):
        (ids,), weight = ctx.saved_tensors, kept_weight(ctx)
        zero_if_stale(weight)
        mg = weight.main_grad
        mg.index_add_(0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]).to(mg.dtype))
        return None, _placeholder(weight)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding`` whose weight gradient goes straight into ``weight.main_grad`` when fusion is on for it."""
    if fuses(weight) and weight.requires_grad and torch.is_grad_enabled():
        return _EmbeddingWgradFused.apply(ids, weight)
    return F.embedding(ids, weight)


# -- grouped (per-expert) weight gradients -----------------------------------------------------------------
def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: List[int], weight: torch.Tensor,
                  offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per group g: dW[g] = dy_g^T x_g ([out, in], the layout of ``weight [G, out, in]``); groups without rows
    get zeros. Written into ``weight.main_grad`` when fusion is on (returns the placeholder), else returned.
    Where ``platform.kernels.per_group_weight_grad`` says so (CPU) it is one GEMM per group with ``out=``
    (into the warm main_grad under fusion: no fresh gradient to allocate, fault in and add); elsewhere one
    torch._grouped_mm 2-D x 2-D launch (``offs``: the int32 cumulative counts) computes it."""
    fused = fuses(weight)
    if offs is not None and not kernels.per_group_weight_grad(dy.device):
        dw = torch._grouped_mm(dy.t(), x, offs=offs)
        if not fused:
            return dw
        accumulate_main_grad(weight, dw)
        return _placeholder(weight)
    if fused:
        dst, overwrite = weight.main_grad, bool(getattr(weight, "main_grad_stale", False))
    else:
        dst, overwrite = torch.empty(weight.shape, dtype=dy.dtype, device=dy.device), True
    start = 0
    for g, n in enumerate(counts):
        if n:
            _mm_into(dst[g], dy[start:start + n].t(), x[start:start + n], overwrite)
        elif overwrite:
            dst[g].zero_()
        start += n
    if fused:
        weight.main_grad_stale = False
        return _placeholder(weight)
    return dst
