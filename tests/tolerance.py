"""The suite's one tolerance rule (docs/ARCHITECTURE.md, "Testing").

Two kinds of comparison, and nothing in between:

* ``assert_equal(a, b, what)`` -- bitwise, for results that are equal *by construction*: the same ops in the
  same order on the same values (a resumed run, a checkpoint round trip, recompute replaying a forward,
  TP1-gathered init vs TP4-gathered init). No tolerance at all.
* ``assert_close(actual, ref, what, terms=N)`` -- two computations of the same value whose floating-point
  *summation order* differs (another GEMM blocking, a TP all-reduce, another CPU kernel, fp32 vs transformers'
  ops). The bound follows the arithmetic, not one machine's rounding:

      max |actual - ref|  <=  k * eps(dtype) * sqrt(terms) * scale,     scale = max |ref|  (or ``scale=``)

  ``terms`` is the length of the longest sum (or chain of rounded ops) behind one element; rounding errors of
  a sum of n terms grow like sqrt(n) * eps * |terms| for random signs. ``k`` (default 8) absorbs the constant.
  ``scale`` defaults to max |ref| over the whole tensor, so a value near 0.3 in a tensor whose largest entry
  is 2.6 is judged on the tensor's scale, as its rounding is. A missing term (a dropped micro-batch, a
  gradient scaled by 1 + 1e-4) is far outside this bound for any test size used here; tests/test_tolerance.py
  shows it.
* ``assert_rel(actual, ref, rel, what)`` -- the product-level parity statement ("logits within 1e-5 of
  transformers", "loss within 5e-4 relative"): max |actual - ref| <= rel * max |ref|. Use it where an issue
  states the figure, never to paper over a sum-order difference that ``assert_close`` should bound.

All three return the measured error so a test can print or collect it. Comparisons are done in float64 so
the check itself adds no rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

DEFAULT_K = 8.0


def eps(dtype: torch.dtype) -> float:
    """Unit roundoff-ish: machine epsilon of ``dtype`` (fp32 1.19e-7, bf16 7.8e-3, fp16 9.8e-4, fp64 2.2e-16)."""
    return torch.finfo(dtype).eps


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max()) if t.numel() else 0.0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return _max_abs(a.detach().double() - b.detach().double())


def sum_order_bound(ref: torch.Tensor, terms: int, k: float = DEFAULT_K, dtype: Optional[torch.dtype] = None,
                    scale: Optional[float] = None) -> float:
    """k * eps(dtype) * sqrt(terms) * scale: the largest difference two summation orders can explain."""
    dt = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
    s = _max_abs(ref) if scale is None else float(scale)
    return k * eps(dt) * math.sqrt(max(int(terms), 1)) * s


def assert_equal(actual: torch.Tensor, ref: torch.Tensor, what: str = "") -> float:
    """Bitwise equality (same ops, same order by construction)."""
    if actual.shape != ref.shape or actual.dtype != ref.dtype:
        raise AssertionError(f"{what}: {tuple(actual.shape)} {actual.dtype} vs {tuple(ref.shape)} {ref.dtype}")
    if not torch.equal(actual, ref):
        raise AssertionError(f"{what}: not bitwise equal (max |diff| {max_abs_diff(actual, ref):.3e}); "
                             f"these are equal by construction, so any difference is a bug")
    return 0.0


def assert_close(actual: torch.Tensor, ref: torch.Tensor, what: str = "", *, terms: int, k: float = DEFAULT_K,
                 dtype: Optional[torch.dtype] = None, scale: Optional[float] = None) -> float:
    """Equal up to the rounding of a different summation order (bound in the module docstring)."""
    err = max_abs_diff(actual, ref)
    bound = sum_order_bound(ref, terms, k, dtype or actual.dtype, scale)
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{what}: max |diff| {err:.3e} > bound {bound:.3e} = {k:g} * eps "
                             f"* sqrt({terms}) * {(_max_abs(ref) if scale is None else scale):.3e}")
    return err


def assert_rel(actual: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "",
               floor: float = 0.0) -> float:
    """max |actual - ref| <= rel * max(max |ref|, floor): a stated product-level parity figure."""
    err = max_abs_diff(actual, ref)
    scale = max(_max_abs(ref), floor)
    if not err <= rel * scale:
        raise AssertionError(f"{what}: max |diff| {err:.3e} > {rel:g} * max |ref| {scale:.3e}")
    return err
