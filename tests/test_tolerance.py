"""The tolerance rule (tests/tolerance.py) on real tensors of the suite: a real summation-order difference passes,
and the bugs it must catch fail it -- a gradient missing one micro-batch's contribution, a gradient scaled by
1 + 1e-4, a NaN, a 1-ulp change of a bitwise result, a weight-decay slip in params after Adam. Also: the CPU
kernel and thread settings reach the suite's worker processes and subprocesses (tests/run_cpu_matrix.py relies
on it)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.harness import kernel_env, run_distributed, worker_threads
from tests.tolerance import (MAX_REL_BOUND, MODEL_REL, assert_close, assert_equal, assert_rel, eps,
                             sum_order_bound)


@pytest.fixture(scope="module")
def wgrad_grads():
    """The DeepSeek model of tests/test_wgrad.py after two steps of 2 micro-batches: main_grad with gradient-
    accumulation fusion on (addmm_ into the buffer) and off (mm + add_), and off with only micro-batch 1."""
    from tests.test_wgrad import _grads_after_two_steps
    on, _ = _grads_after_two_steps(True)
    off, _ = _grads_after_two_steps(False)
    only_second, _ = _grads_after_two_steps(False, micro_batches=(1,))
    only_first, _ = _grads_after_two_steps(False, micro_batches=(0,))
    return on, off, only_second, only_first


def test_real_fused_vs_unfused_gradients_pass(wgrad_grads):
    from tests.test_wgrad import SUM_TERMS_SINGLE
    on, off, _, _ = wgrad_grads
    differ = [n for n in off if not torch.equal(on[n], off[n])]
    for n in off:
        assert_close(on[n], off[n], n, terms=SUM_TERMS_SINGLE)
    print(f"{len(differ)} of {len(off)} gradients differ bitwise between fused and unfused: {differ}")


def test_gradient_scaled_by_1e4_fails(wgrad_grads):
    from tests.test_wgrad import SUM_TERMS_SINGLE
    on, off, _, _ = wgrad_grads
    checked = 0
    for n, g in off.items():
        if float(g.abs().max()) == 0.0:
            continue
        with pytest.raises(AssertionError, match="bound"):
            assert_close(on[n] * (1 + 1e-4), g, n, terms=SUM_TERMS_SINGLE)
        with pytest.raises(AssertionError):
            assert_rel(on[n] * (1 + 1e-4), g, MODEL_REL, n)
        checked += 1
    assert checked > 30


def test_gradient_missing_a_micro_batch_fails(wgrad_grads):
    """Every gradient that micro-batch 0 contributes to fails when that contribution is missing."""
    from tests.test_wgrad import SUM_TERMS_SINGLE
    _, off, only_second, only_first = wgrad_grads
    failed, contributes = 0, 0
    for n, g in off.items():
        if float(only_first[n].abs().max()) <= sum_order_bound(g, SUM_TERMS_SINGLE):
            continue  # micro-batch 0 adds nothing measurable to this one (e.g. an expert it never routes to)
        contributes += 1
        with pytest.raises(AssertionError, match="bound"):
            assert_close(only_second[n], g, n, terms=SUM_TERMS_SINGLE)
        failed += 1
    assert contributes == failed and contributes > 0.8 * len(off), (contributes, len(off))


def test_nan_and_inf_fail():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    bad = g.clone()
    bad[3, 5] = float("nan")
    for a, b in ((bad, g), (g, bad)):
        with pytest.raises(AssertionError):
            assert_close(a, b, "nan", terms=16)
        with pytest.raises(AssertionError):
            assert_rel(a, b, 1e-5, "nan")
        with pytest.raises(AssertionError):
            assert_equal(a, b, "nan")
    inf = g.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(AssertionError):
        assert_close(inf, g, "inf", terms=16)
    both = inf.clone()
    both[1, 1] = float("-inf")
    inf2 = both.clone()
    assert assert_close(both, inf2, "the same infs", terms=16) == 0.0  # masked logits: -inf on both sides


def test_real_sum_order_difference_passes_and_one_ulp_breaks_bitwise():
    """Sums of 2048 fp32 values in three orders (IEEE-exact Python float32 loops, forward and reversed, and
    32 blocks of 64, as another GEMM blocking would): all differ, all pass against the exact fp64 sum and each
    other with terms = 2048; one ulp breaks assert_equal."""
    x = np.random.default_rng(0).standard_normal(2048).astype(np.float32) * 3
    fwd, rev = np.float32(0), np.float32(0)
    for v in x:
        fwd = np.float32(fwd + v)
    for v in x[::-1]:
        rev = np.float32(rev + v)
    blocks = [np.float32(0)] * 32
    for i, v in enumerate(x):
        blocks[i // 64] = np.float32(blocks[i // 64] + v)
    blk = np.float32(0)
    for b in blocks:
        blk = np.float32(blk + b)
    exact = float(np.sum(x.astype(np.float64)))
    sums = {"forward": float(fwd), "reversed": float(rev), "blocked": float(blk)}
    assert len(set(sums.values())) == 3, sums  # three orders, three roundings
    # the scale of a sum is its partial sums' size (here ~ sqrt(2048) * 3): pass it, as the rule says
    partial = float(np.abs(np.cumsum(x.astype(np.float64))).max())
    for name, s in sums.items():
        assert_close(s, exact, f"{name} vs exact", terms=2048, dtype=torch.float32, scale=partial)
        for other, s2 in sums.items():
            assert_close(s, s2, f"{name} vs {other}", terms=2048, dtype=torch.float32, scale=partial)
    # mm + add_ vs addmm_ into an accumulation buffer on a weight-gradient shape (1024 tokens): passes
    g = torch.Generator().manual_seed(1)
    dy, xin, acc = torch.randn(1024, 64, generator=g), torch.randn(1024, 96, generator=g), torch.randn(64, 96,
                                                                                                         generator=g)
    fused = acc.clone().addmm_(dy.t(), xin)
    unfused = acc.clone().add_(dy.t() @ xin)
    assert_close(fused, unfused, "addmm_ vs mm + add_", terms=1024 + 1)
    one_ulp = unfused.clone()
    one_ulp[7, 7] = torch.nextafter(one_ulp[7, 7], torch.tensor(float("inf")))
    assert_close(one_ulp, unfused, "one ulp", terms=1)
    with pytest.raises(AssertionError, match="bitwise"):
        assert_equal(one_ulp, unfused, "one ulp")


def test_params_after_adam_catch_a_weight_decay_slip():
    """The updates-after-Adam form (tests/test_ddp_toymodel.py assert_params_close): the toy run with weight
    decay 0.1 vs 0.09 (a decay applied to the wrong lr or group) fails; the run against itself passes."""
    from tests.test_ddp_toymodel import Run, assert_params_close, initial_params, reference
    run = Run(par={}, steps=3)
    ref, _, _ = reference(run)
    init = initial_params(run)
    assert assert_params_close(ref, ref, init, "itself") > 3
    slipped, _, _ = reference(Run(par={}, steps=3, weight_decay=0.09))
    with pytest.raises(AssertionError, match="bound"):
        assert_params_close(slipped, ref, init, "weight decay 0.09 vs 0.1")


def test_a_bound_that_could_not_see_a_bug_is_refused():
    ref = torch.ones(4)
    # fp32: k * eps * sqrt(terms) must stay below MAX_REL_BOUND, so a 1e-4 scale error always fails
    terms_limit = int((MAX_REL_BOUND / (8 * eps(torch.float32))) ** 2)
    assert_close(ref, ref, "largest allowed", terms=terms_limit)
    with pytest.raises(ValueError, match="could not see"):
        assert_close(ref, ref, "too long a chain", terms=terms_limit * 2)
    with pytest.raises(ValueError, match="could not see"):
        assert_close(ref, ref, "too large a k", terms=16, k=200)
    assert_close(ref.bfloat16(), ref.bfloat16(), "bf16 has no such limit", terms=10_000)
    with pytest.raises(TypeError, match="dtype"):
        assert_close(1.0, 1.0, "numbers need their precision", terms=1)
    # a fp32 result against a fp64 reference is judged at fp32
    x = torch.randn(100, dtype=torch.float64)
    assert_close(x.float(), x, "fp32 rounding of fp64 values", terms=1)
    with pytest.raises(AssertionError):
        assert_close(x.float(), x, "judged at fp64 it would fail", terms=1, dtype=torch.float64)


def _probe():
    import torch as t
    import torch.distributed as dist
    dist.barrier()  # no rank leaves (and closes its connections) before every rank has joined
    return t.backends.cpu.get_cpu_capability(), t.get_num_threads(), os.environ.get("MKL_ENABLE_INSTRUCTIONS")


def test_kernel_settings_reach_workers_and_subprocesses():
    """What tests/run_cpu_matrix.py sets (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, OMP_NUM_THREADS) is what
    the forkserver workers and a subprocess started with kernel_env() run with."""
    mine = torch.backends.cpu.get_cpu_capability()
    for cap, threads, mkl in run_distributed(2, _probe, timeout=120):
        assert (cap, threads, mkl) == (mine, worker_threads(), os.environ.get("MKL_ENABLE_INSTRUCTIONS"))
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    r = subprocess.run([sys.executable, "-c", code], env={**kernel_env(), "PATH": os.environ.get("PATH", "")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == mine, (r.stdout, r.stderr[-500:])
