"""Tensor-parallel mappings, layers, vocab-parallel CE and RNG tracker against single-process math.

One spawned world per TP size runs every check (forward and backward), fp64 where exactness matters."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ascend.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             vocab_parallel_cross_entropy)
from tests.harness import run_distributed
from tests.tolerance import assert_close, assert_equal


def _close(a, b, terms, what=""):
    """terms=0: equal by construction (data movement only), else the sum-order bound (tests/tolerance.py)."""
    if terms == 0:
        assert_equal(a, b, what)
    else:
        assert_close(a, b, what, terms=terms)


def test_cross_entropy_single_process_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (5, 3))
    target[0, 0] = -100
    mask = (torch.rand(5, 3) > 0.3).double()
    loss = vocab_parallel_cross_entropy(logits, target, loss_mask=mask)
    ref = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), reduction="none", ignore_index=-100)
    ref = ref.view(5, 3) * mask
    _close(loss, ref, 11, "loss")  # logsumexp over 11 classes
    g = torch.randn(5, 3, dtype=torch.float64)
    ga, = torch.autograd.grad(loss, logits, g)
    gb, = torch.autograd.grad(ref, logits, g)
    _close(ga, gb, 11, "grad")


def test_cross_entropy_ignores_padded_vocab_columns():
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (4, 2))
    loss = vocab_parallel_cross_entropy(logits, target, vocab_size=9)
    ref = F.cross_entropy(logits[..., :9].reshape(-1, 9), target.reshape(-1), reduction="none").view(4, 2)
    _close(loss, ref, 9, "padded loss")
    g, = torch.autograd.grad(loss.sum(), logits)
    assert g[..., 9:].abs().max().item() == 0.0


def _tp_world_body(seq_parallel_checks=True):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.tensor_parallel import mappings as M
    from megatron_ascend.tensor_parallel import (gather_full, get_rng_tracker, model_parallel_seed, shard_of)
    n = dist.get_world_size()
    pg = initialize_model_parallel(ParallelConfig(world_size=n, tensor_model_parallel_size=n))
    g, r = pg.tp, pg.tp_rank
    dt = torch.float64
    torch.manual_seed(123)  # identical "global" data on every rank
    S, B, H = 4 * n, 2, 6
    xs = [torch.randn(S, B, H, dtype=dt) for _ in range(n)]   # per-rank inputs
    gs = [torch.randn(S, B, H, dtype=dt) for _ in range(n)]   # per-rank upstream grads
    out = {}

    def run(fn, x, grad):
        x = x.clone().requires_grad_(True)
        y = fn(x)
        y.backward(grad)
        return y.detach(), x.grad

    # copy_to: identity forward, all-reduce backward
    y, gx = run(lambda t: M.copy_to_tensor_model_parallel_region(t, g), xs[0], gs[r])
    _close(y, xs[0], 0, "copy fwd"); _close(gx, sum(gs), n, "copy bwd")  # all-reduce of n
    # reduce_from: all-reduce forward, identity backward
    y, gx = run(lambda t: M.reduce_from_tensor_model_parallel_region(t, g), xs[r], gs[0])
    _close(y, sum(xs), n, "reduce fwd"); _close(gx, gs[0], 0, "reduce bwd")
    # scatter / gather along the last dim
    full = torch.cat(xs, -1)
    y, gx = run(lambda t: M.scatter_to_tensor_model_parallel_region(t, g), full, gs[r])
    _close(y, xs[r], 0, "scatter fwd"); _close(gx, torch.cat(gs, -1), 0, "scatter bwd")
    y, gx = run(lambda t: M.gather_from_tensor_model_parallel_region(t, g), xs[r], torch.cat(gs, -1))
    _close(y, full, 0, "gather fwd"); _close(gx, gs[r], 0, "gather bwd")
    # sequence dim (0)
    chunk = S // n
    y, gx = run(lambda t: M.scatter_to_sequence_parallel_region(t, g), xs[0], gs[r][:chunk])
    _close(y, xs[0][r * chunk:(r + 1) * chunk], 0, "sp scatter fwd")
    _close(gx, torch.cat([gg[:chunk] for gg in gs], 0), 0, "sp scatter bwd")
    y, gx = run(lambda t: M.gather_from_sequence_parallel_region(t, g), xs[r][:chunk], gs[r])
    _close(y, torch.cat([x[:chunk] for x in xs], 0), 0, "sp gather fwd")
    _close(gx, sum(gs)[r * chunk:(r + 1) * chunk], n, "sp gather bwd (reduce-scatter)")
    y, gx = run(lambda t: M.gather_from_sequence_parallel_region(t, g, tensor_parallel_output_grad=False),
                xs[r][:chunk], gs[0])
    _close(gx, gs[0][r * chunk:(r + 1) * chunk], 0, "sp gather bwd (split)")
    y, gx = run(lambda t: M.reduce_scatter_to_sequence_parallel_region(t, g), xs[r], gs[r][:chunk])
    _close(y, sum(xs)[r * chunk:(r + 1) * chunk], n, "sp reduce-scatter fwd")
    _close(gx, torch.cat([gg[:chunk] for gg in gs], 0), 0, "sp reduce-scatter bwd")
    # all_to_all with uneven splits: rank i sends (i + j + 1) rows to rank j
    send = [i + r + 1 for i in range(n)]
    recv = [r + j + 1 for j in range(n)]
    xa = torch.arange(sum(send) * 3, dtype=dt).view(-1, 3) + 1000 * r
    y, gx = run(lambda t: M.all_to_all(g, t, recv, send), xa, torch.ones(sum(recv), 3, dtype=dt) * (r + 1))
    expect = []
    for j in range(n):  # rows that rank j sent to me
        xj = torch.arange(sum(r2 + j + 1 for r2 in range(n)) * 3, dtype=dt).view(-1, 3) + 1000 * j
        off = sum(i + j + 1 for i in range(r))
        expect.append(xj[off:off + r + j + 1])
    _close(y, torch.cat(expect, 0), 0, "a2a fwd")
    _close(gx, torch.cat([torch.full((send[i], 3), float(i + 1), dtype=dt) for i in range(n)], 0), 0, "a2a bwd")

    # Column -> Row MLP (with and without sequence parallel) equals the full single-process MLP
    torch.manual_seed(7)
    Hin, F_, Hout = 6, 4 * n, 5
    W1, b1, W2, b2 = (torch.randn(F_, Hin, dtype=dt), torch.randn(F_, dtype=dt),
                      torch.randn(Hout, F_, dtype=dt), torch.randn(Hout, dtype=dt))
    x_full = torch.randn(S, B, Hin, dtype=dt)
    gy = torch.randn(S, B, Hout, dtype=dt)
    xr = x_full.clone().requires_grad_(True)
    W1r, b1r, W2r, b2r = (t.clone().requires_grad_(True) for t in (W1, b1, W2, b2))
    yr = F.linear(torch.tanh(F.linear(xr, W1r, b1r)), W2r, b2r)
    yr.backward(gy)
    for sp in (False, True):
        c = ColumnParallelLinear(Hin, F_, pg, bias=True, sequence_parallel=sp).double()
        rw = RowParallelLinear(F_, Hout, pg, bias=True, sequence_parallel=sp).double()
        with torch.no_grad():
            c.weight.copy_(shard_of(W1, c.weight)); c.bias.copy_(shard_of(b1, c.bias))
            rw.weight.copy_(shard_of(W2, rw.weight)); rw.bias.copy_(b2)
        xin = (x_full[r * chunk:(r + 1) * chunk] if sp else x_full).clone().requires_grad_(True)
        y = rw(torch.tanh(c(xin)))
        y.backward(gy[r * chunk:(r + 1) * chunk] if sp else gy)
        # the MLP's chain: Hin + F_ forward, Hout + F_ backward, a weight / bias grad's sum over the S * B tokens
        mlp = Hin + 2 * F_ + Hout + S * B
        _close(y, yr[r * chunk:(r + 1) * chunk] if sp else yr, mlp, f"mlp fwd sp={sp}")
        _close(xin.grad, xr.grad[r * chunk:(r + 1) * chunk] if sp else xr.grad, mlp, f"mlp dx sp={sp}")
        _close(gather_full(c.weight.grad, c.weight, pg), W1r.grad, mlp, f"dW1 sp={sp}")
        _close(gather_full(c.bias.grad, c.bias, pg), b1r.grad, mlp, f"db1 sp={sp}")
        _close(gather_full(rw.weight.grad, rw.weight, pg), W2r.grad, mlp, f"dW2 sp={sp}")
        bg = rw.bias.grad.clone()
        if sp and n > 1:
            assert rw.bias.sequence_parallel
            dist.all_reduce(bg, group=g)
        _close(bg, b2r.grad, mlp, f"db2 sp={sp}")
        assert c.weight.shard.axes == ({0: ("tp", r, n)} if n > 1 else {})
        assert rw.weight.shard.axes == ({1: ("tp", r, n)} if n > 1 else {})

    # vocab-parallel embedding and cross-entropy (padded vocab 4n+? -> true vocab 4n-1)
    V, Vp = 4 * n - 1, 4 * n
    E = torch.randn(Vp, Hin, dtype=dt)
    ids = torch.randint(0, V, (B, S))
    for sp in (False, True):
        emb = VocabParallelEmbedding(Vp, Hin, pg, sequence_parallel=sp).double()
        with torch.no_grad():
            emb.weight.copy_(shard_of(E, emb.weight))
        y = emb(ids)
        ref = F.embedding(ids, E).transpose(0, 1)
        # one rank holds the row, the others add exact zeros: bitwise at every n
        _close(y, ref[r * chunk:(r + 1) * chunk] if sp else ref, 0, f"embedding sp={sp}")
        gy_e = torch.randn_like(ref)
        y.backward(gy_e[r * chunk:(r + 1) * chunk] if sp else gy_e)
        Er = E.clone().requires_grad_(True)
        F.embedding(ids, Er).transpose(0, 1).backward(gy_e)
        # a row sums its tokens
        _close(gather_full(emb.weight.grad, emb.weight, pg), Er.grad, S * B, f"embedding grad sp={sp}")
    logits = torch.randn(S, B, Vp, dtype=dt) * 3
    tgt = torch.randint(0, V, (S, B))
    tgt[0, 0] = -100
    lmask = (torch.rand(S, B) > 0.2).double()
    loc = logits[..., r * (Vp // n):(r + 1) * (Vp // n)].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(loc, tgt, pg, vocab_size=V, loss_mask=lmask)
    lg = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(lg[..., :V].reshape(-1, V), tgt.reshape(-1), reduction="none").view(S, B) * lmask
    _close(loss, ref, Vp, "vocab-parallel CE")  # logsumexp over the vocab
    loss.sum().backward(); ref.sum().backward()
    _close(loc.grad, lg.grad[..., r * (Vp // n):(r + 1) * (Vp // n)], Vp, "vocab-parallel CE grad")

    # RNG tracker: default stream agrees across TP, the model-parallel stream differs per TP rank,
    # forking leaves the default stream where it was
    model_parallel_seed(1234, pg)
    tr = get_rng_tracker()
    a = torch.rand(4)
    with tr.fork():
        b = torch.rand(4)
    c2 = torch.rand(4)
    model_parallel_seed(1234, pg)
    a2, c3 = torch.rand(4), torch.rand(4)
    _close(a, a2, 0, "default stream repeatable"); _close(c2, c3, 0, "fork restores default stream")
    allv = [torch.empty(4) for _ in range(n)]
    dist.all_gather(allv, a.contiguous())
    allb = [torch.empty(4) for _ in range(n)]
    dist.all_gather(allb, b.contiguous())
    assert all(torch.equal(allv[0], v) for v in allv), "default RNG must agree across TP ranks"
    assert n == 1 or not torch.equal(allb[0], allb[1]), "model-parallel RNG must differ across TP ranks"
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mappings_layers_and_ce_match_single_process(tp):
    assert all(run_distributed(tp, _tp_world_body, timeout=240))
