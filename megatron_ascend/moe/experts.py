"""Routed experts as grouped weights, the grouped matmul they use, and the shared-expert MLP.

Owns:
* ``grouped_linear(x, W, counts)``: x [N, in] sorted by group, W [G, out, in], counts [G] python ints ->
  [N, out] (``grouped_mm`` takes the weight as [G, k, n]): the kernel table's ``grouped_matmul``. On Ascend
  that is torch_npu's / MindSpeed's grouped GEMM (platform/kernels_npu.py); on CPU / CUDA the implementation
  registered here, ``torch._grouped_mm`` when it can run (fp32/bf16/fp16, 16-byte aligned rows) -- with its own
  backward whose weight gradient is one GEMM per expert, written into ``main_grad`` under gradient-accumulation
  fusion (tensor_parallel/wgrad.py) -- else one GEMM per group into the output's rows (``_LoopGroupedLinear``:
  memory independent of the routing, float64 tests and odd sizes).
* ``GroupedExperts`` (``mlp.experts``): ``gate_proj``/``up_proj`` [E_local, I/etp, h] and ``down_proj``
  [E_local, h, I/etp]; expert dim sharded over ep, the I dim over etp; SwiGLU with V4's optional clamp.
  Under expert-TP each etp rank returns a *partial* output (its I slice); the dispatcher sums it.
* ``SharedExperts`` (``mlp.shared_experts``): one SwiGLU MLP of width n_shared_experts * moe_intermediate_size,
  gate/up column-parallel and down row-parallel over tp. ``forward`` returns the *partial* row-parallel
  output (before the TP reduction): the MoE layer fuses that reduction with the routed output.
* ``swiglu_then(gate, up, limit, consumer, recompute)``: ``consumer(swiglu(gate, up))``; with ``recompute``
  (selective ``moe_act``, set by MoELayer as ``recompute_act`` on both expert modules) neither the SwiGLU
  internals (silu(gate)) nor its output (the [tokens, I] input the down projection keeps) are saved: only gate
  and up are kept, and the activation is recomputed from them when backward needs it (Megatron's moe_act,
  CheckpointWithoutOutput). Local compute only: nothing before the activation (router, all-to-all, the
  gate/up matmuls) runs again. The activation is elementwise and cheap; it is evaluated up to twice more in
  backward (once for the down projection's weight grad, once inside the checkpoint for its own grad).
Does not own: token movement (dispatcher.py).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .. import platform
from ..platform import kernels
from ..tensor_parallel import random as tp_random
from ..tensor_parallel import wgrad
from ..tensor_parallel.sharding import init_normal_, mark_sharded


def swiglu_then(gate: torch.Tensor, up: torch.Tensor, limit: float, consumer, recompute: bool = False):
    """``consumer(swiglu(gate, up, limit))``; with ``recompute`` the activation and its internals are not kept for
    backward (recomputed from gate and up, bitwise: same kernel, same inputs). Leaves the autograd graph as
    without recompute (torch's non-reentrant checkpoint records the real ops), so every gradient, including the
    order in which contributions are summed, is the one of no recompute."""
    def act_fn(g, u):
        return kernels.get("swiglu")(g, u, limit)

    if not recompute or not torch.is_grad_enabled():
        return consumer(act_fn(gate, up))
    # Megatron's moe_act: the activation is not kept, only gate and up (silu(gate) is recomputed too)
    return tp_random.checkpoint_discard_output(act_fn, (gate, up), consumer)


def _grouped_mm_native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    es = x.element_size()
    return (x.shape[1] * es) % 16 == 0 and (w.shape[2] * es) % 16 == 0 and x.shape[0] > 0


class _GroupedLinear(torch.autograd.Function):
    """y_g = x_g W[g]^T for W [G, out, in] with torch._grouped_mm forward and input-gradient; the weight
    gradient is one GEMM per group (``wgrad.grouped_wgrad``: into ``W.main_grad`` under gradient-accumulation
    fusion; on CPU that skips a fresh [E, out, in] gradient and its add: 5.5 vs 15.9 ms at h 1024, 32 experts)."""

    @staticmethod
    def forward(ctx, x, weight, counts, offs):
        ctx.save_for_backward(x)
        wgrad.keep_weight(ctx, weight)  # the parameter itself: recompute's saved tensors lose main_grad
        ctx.counts, ctx.offs = counts, offs
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        (x,), weight = ctx.saved_tensors, wgrad.kept_weight(ctx)
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, weight, offs=ctx.offs) if ctx.needs_input_grad[0] else None
        dw = wgrad.grouped_wgrad(dy, x, ctx.counts, weight, ctx.offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class _LoopGroupedLinear(torch.autograd.Function):
    """The fallback where torch._grouped_mm cannot run (float64, unaligned rows, a build or device without it):
    one GEMM per non-empty group written into that group's rows of the output (``mm(out=)``), the input gradient
    likewise, the weight gradient per group (into ``main_grad`` under gradient-accumulation fusion). Memory is
    the output and the input gradient -- the same with every token on one expert as with balanced routing; the
    padded ``bmm`` it replaces built [G, max(counts), in] and [G, max(counts), out] buffers, G times the memory
    and the work when one expert takes all tokens (bench/grouped_fallback_memory.py prints both)."""

    @staticmethod
    def forward(ctx, x, weight, counts):
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for g, c in enumerate(counts):
            if c:
                torch.mm(x[start:start + c], weight[g].t(), out=out[start:start + c])
            start += c
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            start = 0
            for g, c in enumerate(ctx.counts):
                if c:
                    torch.mm(dy[start:start + c], weight[g], out=dx[start:start + c])
                start += c
        dw = wgrad.grouped_wgrad(dy, x, ctx.counts, weight) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def loop_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """The memory-bounded fallback (``_LoopGroupedLinear``): [N, in] x [G, out, in] -> [N, out]."""
    return _LoopGroupedLinear.apply(x, weight, list(counts))


def _torch_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """The kernel table's ``grouped_matmul`` on CPU / CUDA: torch._grouped_mm when it can run, else the loop."""
    key = (x.device.type, x.dtype)
    w = weight.transpose(1, 2)
    if _NATIVE_OK.get(key, True) and _grouped_mm_native_ok(x, w):
        offs = platform.host_ints_to_device(counts, torch.int64, x.device).cumsum(0).to(torch.int32)
        try:
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return _GroupedLinear.apply(x, weight, counts, offs)
            return torch._grouped_mm(x, w, offs=offs)
        except RuntimeError:  # this build / device does not take this dtype (e.g. fp32 on some GPUs)
            _NATIVE_OK[key] = False
    return loop_grouped_linear(x, weight, counts)


kernels.register_fused("grouped_matmul", _torch_grouped_linear, "torch._grouped_mm")  # every kind; NPU bindings first


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[N, in] (rows grouped by expert, ``counts[g]`` rows each) x ``weight`` [G, out, in] -> [N, out]:
    row block g times W[g]^T (the layout of nn.Linear weights, stacked per expert). The kernel table's
    ``grouped_matmul``: torch_npu / MindSpeed grouped GEMM on Ascend, torch._grouped_mm (or the loop) here."""
    if x.shape[0] == 0:
        # keep x AND w in the graph: a rank whose experts got no rows must still run the backward of the
        # all-to-all that delivered those (zero) rows, or its peers wait for it forever
        return x @ weight[0].t() + 0 * weight.sum()
    return kernels.get("grouped_matmul")(x, weight, list(counts))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[N, k] (rows grouped by expert, ``counts[g]`` rows each) x [G, k, n] -> [N, n] (``grouped_linear`` with
    the weight given transposed)."""
    return grouped_linear(x, w.transpose(1, 2), counts)


_NATIVE_OK: dict = {}  # (device type, dtype) -> False once torch._grouped_mm refused it


class GroupedExperts(nn.Module):
    def __init__(self, hidden: int, inter: int, n_experts: int, ep_rank: int, ep_size: int, etp_rank: int,
                 etp_size: int, layer_idx: int, swiglu_limit: float = 0.0):
        super().__init__()
        if n_experts % ep_size:
            raise ValueError(f"expert-model-parallel-size {ep_size} does not divide num-experts {n_experts}; "
                             f"pick a divisor of {n_experts}")
        if inter % etp_size:
            raise ValueError(f"moe_intermediate_size {inter} is not divisible by expert-tensor-parallel-size "
                             f"{etp_size}; pick a divisor of {inter}")
        self.num_local = n_experts // ep_size
        self.first_expert = ep_rank * self.num_local
        self.layer_idx = layer_idx
        self.limit = swiglu_limit
        self.recompute_act = False  # selective recompute 'moe_act' (set through MoELayer.recompute_modules)
        il = inter // etp_size
        self.gate_proj = nn.Parameter(torch.empty(self.num_local, il, hidden))  # [E_local, I/etp, h]
        self.up_proj = nn.Parameter(torch.empty(self.num_local, il, hidden))    # [E_local, I/etp, h]
        self.down_proj = nn.Parameter(torch.empty(self.num_local, hidden, il))  # [E_local, h, I/etp]
        ep, etp = ("ep", ep_rank, ep_size), ("etp", etp_rank, etp_size)
        mark_sharded(self.gate_proj, {0: ep, 1: etp}, is_expert=True)
        mark_sharded(self.up_proj, {0: ep, 1: etp}, is_expert=True)
        mark_sharded(self.down_proj, {0: ep, 2: etp}, is_expert=True)
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            wgrad.mark_wgrad_fusable(p)

    def init_weights(self, std: float, seed: int) -> None:
        for n in ("gate_proj", "up_proj", "down_proj"):
            init_normal_(getattr(self, n), f"model.layers.{self.layer_idx}.mlp.experts.{n}", std, seed,
                         expert_dim=0)

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """x [N, h] grouped by local expert (``counts[i]`` rows for local expert i) -> [N, h]."""
        gate = grouped_linear(x, self.gate_proj, counts)
        up = grouped_linear(x, self.up_proj, counts)
        return swiglu_then(gate, up, self.limit, lambda a: grouped_linear(a, self.down_proj, counts),
                           self.recompute_act)


class _Linear(nn.Module):
    """A bias-free linear holding ``weight`` (private stand-in with the names ColumnParallelLinear /
    RowParallelLinear use; the TP reduction is done by the MoE layer)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = wgrad.mark_wgrad_fusable(nn.Parameter(torch.empty(out_features, in_features)))

    def forward(self, x):
        return wgrad.linear(x, self.weight)


class SharedExperts(nn.Module):
    def __init__(self, hidden: int, width: int, tp_rank: int, tp_size: int, layer_idx: int,
                 swiglu_limit: float = 0.0):
        super().__init__()
        if width % tp_size:
            raise ValueError(f"shared-expert width {width} is not divisible by tensor-model-parallel-size "
                             f"{tp_size}; pick a TP size that divides {width}")
        self.layer_idx = layer_idx
        self.limit = swiglu_limit
        self.recompute_act = False  # selective recompute 'moe_act' (set through MoELayer.recompute_modules)
        wl = width // tp_size
        self.gate_proj = _Linear(wl, hidden)   # column-parallel: weight [W/tp, h]
        self.up_proj = _Linear(wl, hidden)     # column-parallel: weight [W/tp, h]
        self.down_proj = _Linear(hidden, wl)   # row-parallel:    weight [h, W/tp]
        tp = ("tp", tp_rank, tp_size)
        mark_sharded(self.gate_proj.weight, {0: tp})
        mark_sharded(self.up_proj.weight, {0: tp})
        mark_sharded(self.down_proj.weight, {1: tp})

    def init_weights(self, std: float, seed: int) -> None:
        for n in ("gate_proj", "up_proj", "down_proj"):
            init_normal_(getattr(self, n).weight, f"model.layers.{self.layer_idx}.mlp.shared_experts.{n}.weight",
                         std, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., h] (full, replicated over tp) -> partial [..., h] (sum over tp ranks = the MLP output)."""
        return swiglu_then(self.gate_proj(x), self.up_proj(x), self.limit, self.down_proj, self.recompute_act)
