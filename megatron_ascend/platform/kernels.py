"""Fused-kernel table: one name per operation, a plain-PyTorch reference always present, and the fused
implementations a platform offers (torch_npu / MindSpeed on Ascend, torch's fused kernels on CUDA / CPU).

Model code calls ``kernels.get(name)(...)`` and never asks which platform it is on; nothing is monkey-patched.
``get`` returns the first implementation registered for the current platform kind that is not switched off,
else the reference. An implementation may decline a call it cannot take (a dtype, a layout, an op missing from
this torch_npu version): it returns ``fallback(name, reason)(...)``, the reference, and the reason is kept
(``declined()``). ``usage()`` counts the calls per implementation; ``startup_line()`` is the one start-up line
that says which implementation of each entry runs.

Switches: ``--no-fused-kernels`` (every entry takes its reference), ``--reference-kernels NAME ...`` (these
entries), the environment ``MEGATRON_ASCEND_KERNELS=reference`` (the same as --no-fused-kernels).

Entries and their contracts (the reference defines the numbers; fused ones equal it to the rounding of their
dtype, tests/test_kernels_npu.py):

* ``rms_norm(x, weight, eps) -> y`` -- HF / DeepSeek RMSNorm (fp32 statistics, cast back, then the weight);
* ``swiglu(gate, up, limit=0.0) -> silu(gate) * up`` (V4 clamps gate <= limit, up to [-limit, limit]);
* ``rope_interleaved(x [s, b, n, d], cos, sin [s, b, 1, d/2], attention_factor=1.0) -> [s, b, n, d]``: every
  pair (x[2i], x[2i+1]) rotated by its angle, pair layout kept (MLA's RoPE); ``attention_factor`` is the YaRN
  factor already folded into cos / sin (the NPU kernel takes |cos|, |sin| <= 1 only). Reference registered by
  models/deepseek/rope.py;
* ``attention(q, k [s, b, n, dq], v [s, b, n, dv], mask, scale) -> [s, b, n * dv]``: softmax(q k^T scale) v,
  causal when ``mask`` is None, else ``mask`` bool [b, 1, s, s] (True = attend: packed segments, DSA top-k).
  A mask made by ``packed_mask(segment_ids)`` carries its segments, so a varlen kernel can run instead of the
  dense mask. Reference registered by models/deepseek/attention.py;
* ``sliding_attention(q [b, s, H, D], kv [b, s, D], sinks [H], scale, window, block) -> [b, s, H, D]``:
  DeepSeek-V4's sliding-window layer: one shared key/value head, keys t - window < j <= t, a per-head sink
  logit (probability mass, no value). Reference registered by models/deepseek_v4/core_attention.py;
* ``grouped_matmul(x [T, in], weight [G, out, in], counts: List[int]) -> [T, out]``: rows grouped by group,
  ``x_g @ weight[g]^T`` (nn.Linear weights stacked per expert). The reference loops over the groups: memory
  O(T * out) whatever the routing (no padding to the largest group);
* ``moe_permute(x [n, h], idx [n, k]) -> (rows [n*k, h], unpermute)``: the (token, slot) rows stable-sorted by
  expert (``rows[r] = x[order[r] // k]``, ``order = argsort(idx.flatten(), stable)``); ``unpermute(y [n*k, h],
  probs [n, k]) -> [n, h]`` sums ``probs[t, j] * y[row of (t, j)]`` per token in the wider of y's and probs'
  dtypes. Dropless routing only (every idx >= 0);
* ``router_topk(logits, scores [T, E], topk, method, n_group, topk_group, bias, scoring) -> idx [T, K] int64``:
  the experts each token is routed to (no gradient: selection is discrete). Reference registered by
  moe/router.py (``select_experts``).

References for the entries above live here unless noted; implementations for Ascend are in kernels_npu.py,
those built on torch's own fused kernels in kernels_torch.py; moe/experts.py registers its torch._grouped_mm
path (it writes weight gradients into main_grad through tensor_parallel.wgrad, a package below this one).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

ENTRIES = ("rms_norm", "swiglu", "rope_interleaved", "attention", "sliding_attention", "grouped_matmul", "moe_permute",
           "router_topk")

_REFERENCE: Dict[str, Callable] = {}
_IMPLS: Dict[str, List[Tuple[str, Callable, Optional[FrozenSet[str]]]]] = defaultdict(list)
_SELECTED: Dict[str, Tuple[str, Callable]] = {}
_CALLS: Dict[Tuple[str, str], int] = defaultdict(int)
_DECLINED: Dict[str, str] = {}
_STATE = {"kind": None, "all_off": False, "off": frozenset(), "loaded": set()}
REFERENCE = "reference"


def reference(name: str):
    """Decorator: ``fn`` is the reference of ``name``."""
    def deco(fn):
        _REFERENCE[name] = fn
        _SELECTED.clear()
        return fn
    return deco


def register_fused(name: str, fn: Callable, impl: str = "fused", kinds: Optional[Iterable[str]] = None,
                   first: bool = False) -> None:
    """Register an implementation of ``name`` (for the platform ``kinds``, all when None); earlier
    registrations win unless ``first``. Re-registering the same ``impl`` name replaces it."""
    lst = _IMPLS[name]
    lst[:] = [e for e in lst if e[0] != impl]
    entry = (impl, fn, frozenset(kinds) if kinds is not None else None)
    lst.insert(0, entry) if first else lst.append(entry)
    _SELECTED.clear()


def unregister(impl_prefix: str) -> None:
    """Drop every implementation whose name starts with ``impl_prefix`` (tests that swap torch_npu)."""
    for name in list(_IMPLS):
        _IMPLS[name] = [e for e in _IMPLS[name] if not e[0].startswith(impl_prefix)]
    _SELECTED.clear()


def _kind() -> str:
    if _STATE["kind"] is None:
        from .device import get_platform
        _STATE["kind"] = get_platform().kind
    return _STATE["kind"]


def _load(kind: str) -> None:
    if kind in _STATE["loaded"]:
        return
    _STATE["loaded"].add(kind)
    from . import kernels_torch  # noqa: F401  (registers on import)
    if kind == "npu":
        from . import kernels_npu
        kernels_npu.register()


def configure(kind: Optional[str] = None, off: Iterable[str] = (), all_off: bool = False) -> None:
    """Entries ``off`` (or all) on their reference; ``kind`` selects for that platform kind instead of the
    detected one (tests bind the Ascend implementations to a fake torch_npu on CPU; None keeps the current
    choice). Unknown names are a ConfigError (the flag's values)."""
    off = frozenset(off)
    bad = sorted(off - set(ENTRIES))
    if bad:
        from ..config import ConfigError
        raise ConfigError(f"--reference-kernels {' '.join(bad)}: unknown kernel name(s); the table has "
                          f"{' '.join(ENTRIES)}")
    _STATE.update(off=off, all_off=bool(all_off))
    if kind is not None:
        _STATE["kind"] = kind
        _STATE["loaded"].discard(kind)  # a (fake) torch_npu may have appeared since: bind again
    _SELECTED.clear()
    _DECLINED.clear()


def reset() -> None:
    """Back to the detected platform with every fused implementation allowed (tests)."""
    _STATE.update(kind=None, off=frozenset(), all_off=False)
    _STATE["loaded"].clear()
    _SELECTED.clear()
    _DECLINED.clear()


def configure_from_args(args) -> None:
    configure(off=getattr(args, "reference_kernels", None) or (),
              all_off=bool(getattr(args, "no_fused_kernels", False)))


def _off(name: str) -> Optional[str]:
    if _STATE["all_off"]:
        return "--no-fused-kernels"
    if os.environ.get("MEGATRON_ASCEND_KERNELS") == "reference":
        return "MEGATRON_ASCEND_KERNELS=reference"
    if name in _STATE["off"]:
        return "--reference-kernels"
    return None


def _counted(name: str, impl: str, fn: Callable) -> Callable:
    key = (name, impl)

    def run(*args, **kwargs):
        _CALLS[key] += 1
        return fn(*args, **kwargs)

    run.impl, run.entry, run.__wrapped__ = impl, name, fn
    return run


def select(name: str) -> Tuple[str, Callable]:
    """(implementation name, callable) that ``get(name)`` returns."""
    hit = _SELECTED.get(name)
    if hit is not None:
        return hit
    kind = _kind()
    _load(kind)
    if name not in _REFERENCE:
        raise KeyError(f"no reference implementation named {name!r}; register the reference first")
    choice = (REFERENCE, _REFERENCE[name])
    if _off(name) is None:
        for impl, fn, kinds in _IMPLS.get(name, ()):
            if kinds is None or kind in kinds:
                choice = (impl, fn)
                break
    hit = (choice[0], _counted(name, choice[0], choice[1]))
    _SELECTED[name] = hit
    return hit


def get(name: str) -> Callable:
    return select(name)[1]


def is_reference(fn: Callable) -> bool:
    return getattr(fn, "impl", None) == REFERENCE or fn in _REFERENCE.values()


def fallback(name: str, reason: str) -> Callable:
    """The reference of ``name`` for a call its fused implementation declined; ``reason`` is kept once."""
    _DECLINED.setdefault(name, reason)
    _CALLS[(name, REFERENCE + " (declined)")] += 1
    return _REFERENCE[name]


def reference_of(name: str) -> Callable:
    return _REFERENCE[name]


def declined() -> Dict[str, str]:
    return dict(_DECLINED)


def declined_line() -> Optional[str]:
    """One line naming the entries whose fused implementation declined a call (and why), or None: printed by the
    trainer after its first iteration, next to the start-up line."""
    d = declined()
    if not d:
        return None
    return "kernels: these calls ran the reference instead: " + "; ".join(f"{n} ({r})" for n, r in sorted(d.items()))


def usage() -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = defaultdict(dict)
    for (name, impl), n in _CALLS.items():
        out[name][impl] = n
    return dict(out)


def reset_usage() -> None:
    _CALLS.clear()
    _DECLINED.clear()


def table() -> Dict[str, str]:
    """name -> the implementation ``get`` returns now ('reference' or e.g. 'torch_npu.npu_rms_norm')."""
    return {n: select(n)[0] for n in sorted(_REFERENCE)}


def startup_line() -> str:
    """One line: the implementation of every entry, and why an entry is on its reference when a switch says so."""
    parts = []
    for n in sorted(_REFERENCE):
        impl = select(n)[0]
        why = _off(n) if impl == REFERENCE and _IMPLS.get(n) else None
        parts.append(f"{n}={impl}" + (f" ({why})" if why else ""))
    return f"kernels ({_kind()}): " + " ".join(parts)


# -- packed masks -------------------------------------------------------------------------------------------
_PACKED: Dict[int, "PackedSegments"] = {}


class PackedSegments:
    """The segments behind a packed-sequence mask: ``segment_ids [b, s]`` and, computed once on first use (one
    device-to-host read per forward), the cumulative segment ends over the flattened ``b * s`` tokens without
    the leading 0 (torch_npu's ``actual_seq_qlen`` form, ascend_npu.md §1.2)."""

    def __init__(self, segment_ids: torch.Tensor):
        self.segment_ids = segment_ids
        self._ends: Optional[List[int]] = None

    def cumulative_ends(self) -> List[int]:
        if self._ends is None:
            ids = self.segment_ids
            b, s = ids.shape
            change = torch.ones(b, s, dtype=torch.bool, device=ids.device)
            change[:, :-1] = ids[:, 1:] != ids[:, :-1]  # last token of a segment (and of each row)
            self._ends = (torch.nonzero(change.reshape(-1)).flatten() + 1).tolist()
        return self._ends


def packed_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask bool [b, 1, s, s] (True = attend) of packed sequences, remembered with its
    segments (``packed_segments(mask)``) for as long as the mask lives, so that a varlen attention kernel can
    take the segment list instead of the dense mask."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal).unsqueeze(1)
    key = id(mask)
    _PACKED[key] = PackedSegments(segment_ids)
    import weakref
    weakref.finalize(mask, _PACKED.pop, key, None)
    return mask


def packed_segments(mask: Optional[torch.Tensor]) -> Optional[PackedSegments]:
    return None if mask is None else _PACKED.get(id(mask))


# -- references ---------------------------------------------------------------------------------------------
@reference("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF/DeepSeek RMSNorm: computed in fp32, cast back, then scaled by the weight."""
    dtype = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


@reference("swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(gate) * up; V4 clamps gate to <= limit and up to [-limit, limit] when limit > 0."""
    if limit and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


@reference("grouped_matmul")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """x [T, in] grouped by ``counts`` (host ints), weight [G, out, in] -> [T, out], one GEMM per non-empty
    group: memory is the output's (plus the concatenation) whatever the routing -- no [G, max(counts), in]
    padding."""
    if x.shape[0] == 0:  # keep the weight in the graph (a rank with no rows still runs its backward)
        return x.new_zeros(0, weight.shape[1]) + 0 * weight.sum()
    outs, start = [], 0
    for g, c in enumerate(counts):
        if c:
            outs.append(x[start:start + c] @ weight[g].t())
        start += c
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


class _ExpandPermute(torch.autograd.Function):
    """rows = x[src] (each token's k copies, permuted); backward: g[inv] summed over the k copies (gathers
    only, no scatter-add)."""

    @staticmethod
    def forward(ctx, x, src, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv).view(-1, ctx.k, g.shape[1]).sum(1), None, None, None


class _PermuteCombine(torch.autograd.Function):
    """out[t] = sum_j p[t, j] * y[inv[t*k + j]] as one batched [1, k] x [k, h] GEMM per token (forward) and a
    broadcast multiply + batched [k, h] x [h, 1] GEMM (backward), gathers only; keeps the token-major y."""

    @staticmethod
    def forward(ctx, y, p, inv, order, n, k):
        yp = y.index_select(0, inv)  # token-major: row t * k + j
        ctx.save_for_backward(yp, p, order)
        ctx.n, ctx.k = n, k
        return torch.bmm(p.view(n, 1, k), yp.view(n, k, -1)).view(n, -1)

    @staticmethod
    def backward(ctx, g):
        yp, p, order = ctx.saved_tensors
        n, k = ctx.n, ctx.k
        g = g.contiguous()
        gy = (p.view(n, k, 1) * g.view(n, 1, -1)).view(n * k, -1).index_select(0, order)
        gp = torch.bmm(yp.view(n, k, -1), g.view(n, -1, 1)).view(n, k)
        return gy, gp, None, None, None, None


class _Unpermute:
    """The reference's unpermute: inverse permutation + weighted sum over the k slots of each token."""

    def __init__(self, order: torch.Tensor, inv: torch.Tensor, n: int, k: int):
        self.order, self.inv, self.n, self.k = order, inv, n, k

    def __call__(self, y: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(y.dtype, probs.dtype)
        return _PermuteCombine.apply(y.to(dtype), probs.to(dtype).contiguous(), self.inv, self.order, self.n,
                                     self.k)


@reference("moe_permute")
def moe_permute(x: torch.Tensor, idx: torch.Tensor):
    """(rows [n*k, h] sorted by expert, stable; unpermute) -- see the module docstring. Dispatch is expand +
    permute and combine is inverse permute + sum over k, both with gather-only backwards."""
    n, k = idx.shape
    order = torch.argsort(idx.reshape(-1), stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    rows = _ExpandPermute.apply(x, torch.div(order, k, rounding_mode="floor"), inv, k)
    return rows, _Unpermute(order, inv, n, k)


def per_group_weight_grad(device: torch.device) -> bool:
    """Whether a grouped (per-expert) weight gradient runs as one GEMM per group written into ``main_grad``
    (True on CPU: the GEMMs cost the same as torch._grouped_mm's 2-D x 2-D mode, but writing into the warm
    grad buffer avoids allocating, page-faulting and adding a fresh [E, out, in] gradient -- 5.5 vs 15.9 ms at
    the large benchmark's expert shapes, bench/moe_dispatch.py) rather than one grouped-GEMM launch
    (accelerators: a caching allocator, and per-group launches would be the slow path)."""
    return torch.device(device).type == "cpu"
