"""A toy model split the way TP / SP / EP / PP layers split DeepSeek, with its collectives written by hand,
and the training loop the DDP / optimizer tests run at every layout (plus a single-process reference that
uses only torch: plain backward, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW).

Model (global sizes H=8, F=16, E=4 experts), tokens x [n, H]:
  stage 0 "dense":  x + fc2(tanh(fc1(rms(x) * norm_weight))) + fc2_bias
                    fc1 column-parallel (dim 0 over tp, bias too), fc2 row-parallel (dim 1 over tp);
                    with SP the tokens are split over tp: all-gather before fc1, reduce-scatter after fc2,
                    so norm_weight and fc2_bias get partial grads (param.sequence_parallel);
                    without SP: copy-to-tp before fc1, all-reduce after fc2 (they are TP duplicates).
  stage 1 "moe":    x + sum_e softmax(rms(x) router^T + router_bias)_e * tanh(rms(x) W_e^T), experts split
                    over ep (dim 0, is_expert); tokens of the ep group are all-gathered, each rank applies its
                    experts, partial outputs are reduce-scattered back; router_bias is a buffer.
  loss:             sum over tokens of mean_h (rms(x) * final_norm_weight - target)^2 / N_global.
With PP 2, stage 0 and stage 1 live on different ranks (p2p by hand, one microbatch at a time).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from megatron_ascend.config import OptimizerConfig, ParallelConfig
from megatron_ascend.distributed import DistributedDataParallel
from megatron_ascend.optimizer import build_optimizer
from megatron_ascend.parallel_state import initialize_model_parallel
from megatron_ascend.tensor_parallel.sharding import init_normal_, mark_sharded, shard_spec
from tests.tolerance import ADAM_AMPLIFICATION, assert_close

H, F, E = 8, 16, 4
# The toy's longest chain of sums, forward (rms 8, fc1 8, fc2 16, rms 8, router 8, softmax 4, expert 8, expert sum
# 4, final rms 8, mean 8) and the same backward, plus a weight gradient's sum over the 16 tokens of a step:
# the ``terms`` of every sum-order comparison of its grads, norms and updates (tests/tolerance.py)
TOY_TERMS = 2 * (8 + 8 + 16 + 8 + 8 + 4 + 8 + 4 + 8 + 8) + 16
_rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _gather_rows(x, group):
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    _ag(out, x.contiguous(), group=group)
    return out


def _scatter_rows(x, group):
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    _rs(out, x.contiguous(), group=group)
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return _scatter_rows(g, ctx.group), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_rows(g, ctx.group), None


def _rms(x, w=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return y if w is None else y * w


class Toy(nn.Module):
    def __init__(self, groups=None, pre=True, post=True, moe=True, sp=False, dtype=torch.float64, seed=7):
        super().__init__()
        tp, tpr = (groups.tp_size, groups.tp_rank) if groups is not None else (1, 0)
        ep, epr = (groups.ep_size, groups.ep_rank) if groups is not None else (1, 0)
        assert not (moe and tp > 1 and not sp), "experts fold over tp ranks: use SP when tp > 1 (as Megatron)"
        self.groups, self.sp, self.tp, self.ep, self.epr, self.moe_on = groups, sp, tp, ep, epr, moe
        self.pre, self.post = pre, post

        def P(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype))

        if pre:
            d = self.dense = nn.Module()
            d.norm_weight = mark_sharded(P(H), sequence_parallel=sp)
            d.fc1_weight = mark_sharded(P(F // tp, H), {0: ("tp", tpr, tp)})
            d.fc1_bias = mark_sharded(P(F // tp), {0: ("tp", tpr, tp)})
            d.fc2_weight = mark_sharded(P(H, F // tp), {1: ("tp", tpr, tp)})
            d.fc2_bias = mark_sharded(P(H), sequence_parallel=sp)
        if post:
            if moe:
                m = self.moe = nn.Module()
                m.router_weight = mark_sharded(P(E, H), sequence_parallel=sp)
                m.experts_weight = mark_sharded(P(E // ep, H, H), {0: ("ep", epr, ep)}, is_expert=True)
                m.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32))
            self.final_norm_weight = mark_sharded(P(H), sequence_parallel=sp)
        with torch.no_grad():
            for name, p in self.named_parameters():
                init_normal_(p, name, 0.3, seed, expert_dim=0 if p.is_expert else None)
                if "norm" in name:
                    p.add_(1.0)

    def forward_pre(self, x):
        d, g = self.dense, self.groups
        y = _rms(x, d.norm_weight)
        if self.tp > 1:
            y = _Gather.apply(y, g.tp) if self.sp else _Copy.apply(y, g.tp)
        a = torch.tanh(y @ d.fc1_weight.t() + d.fc1_bias)
        z = a @ d.fc2_weight.t()
        if self.tp > 1:
            z = _Scatter.apply(z, g.tp) if self.sp else _Reduce.apply(z, g.tp)
        return x + z + d.fc2_bias

    def forward_post(self, x, target, n_norm):
        if self.moe_on:
            m, g = self.moe, self.groups
            y = _rms(x)
            p = torch.softmax(y @ m.router_weight.t() + m.router_bias.to(x.dtype), dim=-1)
            if self.ep > 1:
                y, p = _Gather.apply(y, g.ep), _Gather.apply(p, g.ep)
            e_loc = E // self.ep
            out = 0
            for i in range(e_loc):
                e = self.epr * e_loc + i
                out = out + p[:, e:e + 1] * torch.tanh(y @ m.experts_weight[i].t())
            if self.ep > 1:
                out = _Scatter.apply(out, g.ep)
            x = x + out
        xf = _rms(x, self.final_norm_weight)
        return ((xf - target) ** 2).mean(-1).sum() / n_norm


def make_data(steps, n_tokens, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, n_tokens, H, generator=g).to(dtype)
    t = torch.randn(steps, n_tokens, H, generator=g).to(dtype)
    return x, t


@dataclasses.dataclass
class Run:
    """One layout + settings. par: ParallelConfig kwargs (world_size added by the body)."""
    par: dict
    distributed: bool = False
    overlap: bool = False
    bucket_size: int = None
    sp: bool = False
    moe: bool = True
    dtype: torch.dtype = torch.float64
    scaling: str = "sum"
    align: int = 64
    microbatches: int = 2
    steps: int = 3
    n_tokens: int = 16
    clip_grad: float = 0.05
    weight_decay: float = 0.1

    def opt_cfg(self):
        return OptimizerConfig(lr=0.01, weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                               adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8,
                               bf16=self.dtype == torch.bfloat16)


def build(run: Run, world: int):
    par = ParallelConfig(world_size=world, sequence_parallel=run.sp, **run.par)
    pg = initialize_model_parallel(par)
    model = Toy(pg, pg.is_first_stage, pg.is_last_stage, run.moe, run.sp, run.dtype)
    grad_dtype = torch.float32 if run.dtype == torch.bfloat16 else run.dtype
    ddp = DistributedDataParallel(model, pg, bucket_size=run.bucket_size, overlap_grad_reduce=run.overlap,
                                  use_distributed_optimizer=run.distributed, grad_dtype=grad_dtype,
                                  gradient_scaling=run.scaling, align=run.align)
    opt = build_optimizer([ddp], run.opt_cfg(), pg)
    return pg, model, ddp, opt


def microbatch(pg, model, x, t, n_norm):
    """Forward + backward of one microbatch on this rank's stage(s)."""
    if pg.pp_size == 1:
        model.forward_post(model.forward_pre(x), t, n_norm).backward()
        return
    peers = pg.ranks["pp"]
    if model.pre:
        h = model.forward_pre(x)
        dist.send(h.detach().contiguous(), dst=peers[pg.pp_rank + 1])
        gh = torch.empty_like(h)
        dist.recv(gh, src=peers[pg.pp_rank + 1])
        h.backward(gh)
    else:
        h = torch.empty(x.shape, dtype=x.dtype)
        dist.recv(h, src=peers[pg.pp_rank - 1])
        h.requires_grad_(True)
        model.forward_post(h, t, n_norm).backward()
        dist.send(h.grad.contiguous(), dst=peers[pg.pp_rank - 1])


def local_batch(run: Run, pg, xs, ts, step):
    """This rank's microbatches of global step ``step``: dp chunk, then microbatches, then the SP chunk."""
    rows = xs[step].chunk(pg.dp_size)[pg.dp_rank]
    trows = ts[step].chunk(pg.dp_size)[pg.dp_rank]
    out = []
    for x, t in zip(rows.chunk(run.microbatches), trows.chunk(run.microbatches)):
        if run.sp:
            x, t = x.chunk(pg.tp_size)[pg.tp_rank], t.chunk(pg.tp_size)[pg.tp_rank]
        out.append((x, t))
    return out


def _clone_with_spec(p):
    c = p.detach().clone()
    c.shard = shard_spec(p)
    return c


def run_steps(run: Run, pg, model, ddp, opt, steps, before_step=None):
    """Train global steps ``steps`` (indices into the run's data); returns (norms, oks, launched)."""
    xs, ts = make_data(run.steps, run.n_tokens, run.dtype)
    n_norm = run.n_tokens if run.scaling == "sum" else run.n_tokens // pg.dp_size
    norms, oks, launched = [], [], []
    for s in steps:
        opt.zero_grad()
        mbs = local_batch(run, pg, xs, ts, s)
        for i, (x, t) in enumerate(mbs):
            ctx = ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext()
            with ctx:
                microbatch(pg, model, x, t, n_norm)
        launched.append([b.launched for buf in ddp.grad_buffers for b in buf.buckets])
        if before_step is not None:
            before_step(s, pg, model, ddp, opt)
        ok, norm, _ = opt.step()
        oks.append(ok)
        norms.append(norm)
    return norms, oks, launched


def train(run: Run, world: int, hooks=(), before_step=None):
    """Train ``run.steps`` steps; returns {'params': {name: local tensor (with .shard)}, 'norms', 'ok',
    'launched' (per step: bucket launched before finish_grad_sync), 'pg', 'model', 'ddp', 'opt'}."""
    pg, model, ddp, opt = build(run, world)
    for h in hooks:
        opt.register_post_step_hook(h)
    norms, oks, launched = run_steps(run, pg, model, ddp, opt, range(run.steps), before_step)
    params = {n: _clone_with_spec(p) for n, p in model.named_parameters()}
    return {"params": params, "norms": norms, "ok": oks, "launched": launched, "pg": pg, "model": model,
            "ddp": ddp, "opt": opt}


def reference(run: Run):
    """Single process, torch only: full batch per step, clip_grad_norm_, torch.optim.AdamW."""
    model = Toy(None, True, True, run.moe, False, run.dtype)
    xs, ts = make_data(run.steps, run.n_tokens, run.dtype)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() > 1]
    no_decay = [p for n, p in named if p.dim() <= 1]
    cfg = run.opt_cfg()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    norms, grads0 = [], None
    for s in range(run.steps):
        opt.zero_grad()
        model.forward_post(model.forward_pre(xs[s]), ts[s], run.n_tokens).backward()
        if grads0 is None:
            grads0 = {n: p.grad.detach().clone() for n, p in named}
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)))
        opt.step()
    return {n: p.detach().clone() for n, p in named}, norms, grads0


def local_slice(full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a single-process tensor (the param's ShardSpec)."""
    return full[shard_spec(local).slices(tuple(local.shape))]


def grad_errors_at_step0(ref_grads, where=""):
    """A ``before_step`` callback: after finish_grad_sync, the main grads of the elements this rank's optimizer
    owns (the whole local param without the distributed optimizer) equal the reference grads up to the toy's
    sum-order bound (judged on the whole reference tensor's scale). ``box["compared"]`` counts the tensors."""
    box = {}

    def check(step, pg, model, ddp, opt):
        if step != 0:
            return
        ddp.finish_grad_sync()
        box["compared"] = 0
        for e in opt.entries:
            a, b = e.flat_range
            full = ref_grads[e.name]
            r = local_slice(full, e.param).reshape(-1)[a:b]
            assert_close(e.grad_view.reshape(-1), r.to(e.grad_view.dtype), f"{where} step-0 grad of {e.name}",
                         terms=TOY_TERMS, scale=float(full.abs().max()))
            box["compared"] += 1
    return check, box


def initial_params(run: Run):
    """The toy's initial parameters (the init is layout independent: every layout starts from these)."""
    return {n: p.detach().clone() for n, p in Toy(None, True, True, run.moe, False, run.dtype).named_parameters()}


def assert_params_close(params, ref_params, init, where=""):
    """Params after Adam steps = the reference's: p - ref judged on ADAM_AMPLIFICATION x the largest update
    the reference made to that tensor (tests/tolerance.py). Returns the number of tensors compared."""
    for n, p in params.items():
        r, p0 = local_slice(ref_params[n], p), local_slice(init[n], p)
        assert r.shape == p.shape, (n, r.shape, p.shape)
        moved = float((ref_params[n] - init[n]).abs().max())
        assert moved > 0, f"{where}: the reference never moved {n}"
        assert_close(p.detach(), r, f"{where} {n} after the steps", terms=TOY_TERMS,
                     scale=ADAM_AMPLIFICATION * moved)
    return len(params)


# --------------------------------------------------------------------------------------------- self-checks
def test_toy_single_process_matches_reference_loop():
    """The toy's loop at world 1 (DDP + our optimizer, groups=None) equals the torch-only reference."""
    run = Run(par={}, steps=3)
    ref, ref_norms, _ = reference(run)
    model = Toy(None, True, True, True, False, run.dtype)
    ddp = DistributedDataParallel(model, None, grad_dtype=run.dtype)
    opt = build_optimizer(ddp, run.opt_cfg(), None)
    xs, ts = make_data(run.steps, run.n_tokens, run.dtype)
    for s in range(run.steps):
        opt.zero_grad()
        for i, (x, t) in enumerate(zip(xs[s].chunk(2), ts[s].chunk(2))):
            with (ddp.no_sync() if i == 0 else contextlib.nullcontext()):
                model.forward_post(model.forward_pre(x), t, run.n_tokens).backward()
        ok, norm, _ = opt.step()
        assert ok
        assert_close(norm, ref_norms[s], f"grad norm step {s}", dtype=run.dtype, terms=norm_terms(ref))
        assert ref_norms[s] > run.clip_grad  # clipping is active in these runs
    assert_params_close(dict(model.named_parameters()), ref, initial_params(run), "world 1")


def norm_terms(params):
    """A grad norm's ``terms``: the toy's chain behind each gradient plus the sum of every element's square
    (``params``: the whole model's {name: tensor})."""
    return TOY_TERMS + sum(p.numel() for p in params.values())
