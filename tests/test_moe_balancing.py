"""Load balancing: sequence-wise / batch aux loss and z-loss values against direct formulas, their gradient
injection (MoEAuxLossAutoScaler with a settable scale), their parity with the single-process layer under
TP (SP on and off), EP and DP, the expert-bias update over the global batch (identical on every rank), and
the load statistics."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import run_distributed
from test_moe_common import moe_terms, reduce_grad, setup_groups
from tolerance import assert_close, assert_equal

from megatron_ascend.config import ModelConfig

E, H = 8, 16


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=H, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=3,
                num_attention_heads=2, n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=2,
                q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                first_k_dense_replace=0, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, init_method_std=0.3, aux_loss_alpha=0.01)
    base.update(kw)
    return ModelConfig(**base)


def _direct_seq_aux(scores, idx, b, s, alpha, k):
    """HF remote-code form: ce[b,e] = count / (S*K/E); aux = alpha * mean_b sum_e ce * mean_t s'."""
    sn = scores / scores.sum(-1, keepdim=True)
    sn = sn.view(s, b, E).transpose(0, 1)          # tokens are [s, b] flattened
    ids = idx.view(s, b, k).transpose(0, 1).reshape(b, -1)
    ce = torch.zeros(b, E, dtype=scores.dtype).scatter_add_(1, ids, torch.ones_like(ids, dtype=scores.dtype))
    ce = ce / (s * k / E)
    return alpha * (ce * sn.mean(1)).sum(1).mean()


def _direct_batch_aux(scores, idx, alpha, k):
    t = scores.shape[0]
    sn = scores / scores.sum(-1, keepdim=True)
    tokens = torch.bincount(idx.reshape(-1), minlength=E).to(scores.dtype)
    return E * alpha / (k * t * t) * (sn.sum(0) * tokens).sum()


@pytest.mark.parametrize("kind", ["seq_aux_loss", "aux_loss", "z_loss"])
def test_aux_loss_values_and_injected_gradient(kind):
    from megatron_ascend.moe import MoELayer, collect_load_stats, set_aux_loss_scale
    over = dict(moe_router_load_balancing_type=kind) if kind != "z_loss" else \
        dict(moe_router_load_balancing_type="none", moe_z_loss_coeff=0.05)
    cfg = _cfg(**over)
    s, b = 5, 3
    lay = MoELayer(cfg, None, None, 0, seed=2).double()
    plain = MoELayer(dataclasses.replace(cfg, aux_loss_alpha=0.0, moe_z_loss_coeff=0.0), None, None, 0, seed=2).double()
    torch.manual_seed(0)
    x = torch.randn(s, b, H, dtype=torch.float64)
    gy = torch.randn(s, b, H, dtype=torch.float64)
    scale = 0.25
    set_aux_loss_scale(scale)
    try:
        y = lay(x)
        y.backward(gy)
    finally:
        set_aux_loss_scale(1.0)
    # direct formula on the router outputs, differentiated by autograd
    w, idx, scores, logits = plain.gate(x.reshape(-1, H))
    if kind == "seq_aux_loss":
        aux = _direct_seq_aux(scores, idx, b, s, cfg.aux_loss_alpha, cfg.num_experts_per_tok)
    elif kind == "aux_loss":
        aux = _direct_batch_aux(scores, idx, cfg.aux_loss_alpha, cfg.num_experts_per_tok)
    else:
        aux = 0.05 * torch.logsumexp(logits, -1).square().mean()
    y2 = plain(x)
    (y2 * gy).sum().add(scale * aux).backward()
    assert_equal(y.detach(), y2.detach(), "output with vs without the aux loss")  # the loss never changes it
    # injected aux gradient vs autograd of the direct formula (fp64): the layer's chain over s * b tokens, and the
    # formula's sums over tokens x experts
    for (n, p), (_, q) in zip(lay.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad, f"{kind}: grad of {n}", terms=moe_terms(cfg, s * b) + s * b * E)
    stats = collect_load_stats(lay)
    assert_close(stats[f"moe/layer_0/{kind}"], float(aux.detach()), f"logged {kind}", dtype=torch.float64,
                 terms=s * b * E)
    # the aux term really moved the router grad (not a test that cannot fail)
    plain.zero_grad()
    plain(x).backward(gy)
    assert not torch.allclose(lay.gate.weight.grad, plain.gate.weight.grad, rtol=0, atol=1e-12)


def test_eval_forward_does_not_count_for_the_bias():
    from megatron_ascend.moe import MoELayer
    lay = MoELayer(_cfg(), None, None, 0)
    with torch.no_grad():
        lay(torch.randn(4, 2, H))
    assert float(lay.gate.local_tokens_per_expert.sum()) == 0
    assert float(lay.gate.stat_tokens_per_expert.sum()) == 4 * 2 * 2
    lay(torch.randn(4, 2, H))
    assert float(lay.gate.local_tokens_per_expert.sum()) == 4 * 2 * 2


# ---- distributed ---------------------------------------------------------------------------------------
def _data(d, m, s, b):
    g = torch.Generator().manual_seed(1000 * d + m)
    return torch.randn(s, b, H, generator=g, dtype=torch.float64), torch.randn(s, b, H, generator=g,
                                                                                 dtype=torch.float64)


def _balance_case(par, pg, lb, sp, n_micro=2, rate=1e-3):
    from megatron_ascend.moe import MoELayer, collect_load_stats, set_aux_loss_scale, update_expert_bias
    from megatron_ascend.tensor_parallel.sharding import shard_spec
    over = dict(moe_router_load_balancing_type=lb, moe_z_loss_coeff=0.02 if lb != "none" else 0.0)
    cfg = _cfg(**over)
    s, b, tp, dp = 4, 2, pg.tp_size, pg.dp_size

    def build(par_, pg_):
        layers = torch.nn.ModuleList([MoELayer(cfg, par_, pg_, i, seed=5) for i in (1, 2)]).double()
        with torch.no_grad():
            for lay in layers:
                lay.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, E, dtype=torch.float64))
        return layers

    def run(layers, x):
        for lay in layers:
            x = x + lay(x)
        return x

    ref, mine = build(None, None), build(par, pg)
    errs = {}
    with torch.no_grad():  # an eval forward counts for monitoring but not for the bias, and adds no aux loss
        xe = _data(pg.dp_rank, 99, s, b)[0]
        run(mine, xe.chunk(tp, 0)[pg.tp_rank].contiguous() if sp else xe)
    errs["eval_not_counted"] = float(sum(lay.gate.local_tokens_per_expert.sum() for lay in mine))
    errs["eval_no_aux"] = float(sum(getattr(lay.gate, "aux_calls", 0) for lay in mine))
    collect_load_stats(mine, pg)  # reset the monitoring counters
    set_aux_loss_scale(1.0 / (dp * n_micro))
    try:
        for d in range(dp):
            for m in range(n_micro):
                x, gy = _data(d, m, s, b)
                run(ref, x.requires_grad_()).backward(gy)
        for m in range(n_micro):
            x, gy = _data(pg.dp_rank, m, s, b)
            if sp:
                x, gy = x.chunk(tp, 0)[pg.tp_rank], gy.chunk(tp, 0)[pg.tp_rank]
            run(mine, x.contiguous().requires_grad_()).backward(gy.contiguous())
    finally:
        set_aux_loss_scale(1.0)
    refp = dict(ref.named_parameters())
    where = f"rank {pg.rank} tp{tp} ep{pg.ep_size} sp{int(sp)} {lb}"
    tokens = s * b * dp * n_micro
    terms = 2 * moe_terms(cfg, tokens)  # fp64; two layers in series, every micro-batch's tokens
    # a gradient that is 0 in theory is the rounding of sums as large as the others: judge on the largest one
    layer_scale = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    for n, p in mine.named_parameters():
        want = refp[n].grad[shard_spec(p).slices(p.shape)]
        assert_close(reduce_grad(p, pg), want, f"{where}: grad of {n}", terms=terms,
                     scale=max(float(refp[n].grad.abs().max()), layer_scale))
    # load statistics and logged aux values over the tp-dp group equal the single-process ones
    stats_ref = collect_load_stats(ref, None)
    stats = collect_load_stats(mine, pg)
    errs["stats_keys"] = 0.0 if set(stats) == set(stats_ref) and any(k.endswith(lb) for k in stats) else 1.0
    for k in stats_ref:  # counts are exact; the logged losses are sums over tokens x experts
        assert_close(stats.get(k, float("nan")), stats_ref[k], f"{where}: stat {k}", dtype=torch.float64,
                     terms=tokens * E)
    # bias update: the direct formula on the single-process global-batch counts
    before = [lay.gate.e_score_correction_bias.clone() for lay in ref]
    loads = [lay.gate.local_tokens_per_expert.clone() for lay in ref]
    # the step +-rate is formed in fp32 (the bias buffer's training dtype; counts are exact in fp32), then added
    expect = [b0 + (torch.sign(c.mean() - c) * torch.tensor(rate, dtype=torch.float32)).to(b0) for b0, c in
              zip(before, loads)]
    update_expert_bias(mine, pg, rate)
    update_expert_bias(ref, None, rate)
    bias = [lay.gate.e_score_correction_bias.clone() for lay in mine]
    for a, e_, r in zip(bias, expect, ref):
        assert_equal(a, e_, f"{where}: bias update vs the formula")
        # the same function on the same (integer) global counts: bitwise
        assert_equal(a, r.gate.e_score_correction_bias, f"{where}: bias update vs the single-process update")
    errs["bias_moved"] = 0.0 if all(bool((a != b0).any()) for a, b0 in zip(bias, before)) else 1.0
    errs["counts_zeroed"] = float(sum(lay.gate.local_tokens_per_expert.abs().sum() for lay in mine))
    return [t.tolist() for t in bias], errs


def _body(layouts):
    out = []
    for lay in layouts:
        par, pg = setup_groups(lay["tp"], lay["ep"], lay.get("etp"), lay.get("sp", False))
        for lb in lay["lb"]:
            name = f"tp{lay['tp']} ep{lay['ep']} etp{par.etp} sp{int(lay.get('sp', False))} {lb}"
            out.append((name,) + tuple(_balance_case(par, pg, lb, lay.get("sp", False))))
    return out


LAYOUTS = [dict(tp=2, ep=1, sp=True, lb=["seq_aux_loss", "aux_loss"]),
           dict(tp=2, ep=2, etp=1, lb=["seq_aux_loss"]),
           dict(tp=1, ep=4, lb=["seq_aux_loss", "aux_loss"]),
           dict(tp=2, ep=2, sp=True, lb=["seq_aux_loss"])]


def test_balance_losses_and_bias_update_distributed():
    results = run_distributed(4, _body, LAYOUTS, timeout=240)
    bad = []
    for rank, rows in enumerate(results):
        for name, bias, errs in rows:
            for k, v in errs.items():  # counts and flags (the values were compared in the workers)
                if v != 0:
                    bad.append(f"rank {rank} [{name}] {k}: {v:.2e}")
    assert not bad, "\n".join(bad)
    # the bias is bitwise identical on every rank
    for i in range(len(results[0])):
        assert all(r[i][1] == results[0][i][1] for r in results), results[0][i][0]


def test_activation_recompute_counts_once_and_matches():
    """Non-reentrant checkpoint replays the forward inside backward: same grads, bias counts and logged aux
    values counted once, and the per-layer aux_loss_scale overrides the global one."""
    from megatron_ascend.moe import MoELayer, collect_load_stats
    cfg = _cfg()
    a = MoELayer(cfg, None, None, 0, seed=4).double()
    c = MoELayer(cfg, None, None, 0, seed=4).double()
    a.aux_loss_scale = c.aux_loss_scale = 0.5
    torch.manual_seed(0)
    x = torch.randn(4, 2, H, dtype=torch.float64)
    gy = torch.randn_like(x)
    a(x.clone().requires_grad_()).backward(gy)
    y = torch.utils.checkpoint.checkpoint(c, x.clone().requires_grad_(), use_reentrant=False)
    y.backward(gy)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert_equal(q.grad, p.grad, f"recomputed grad of {n}")  # the replay runs the same ops on the same values
    assert torch.equal(a.gate.local_tokens_per_expert, c.gate.local_tokens_per_expert)
    assert collect_load_stats(a) == collect_load_stats(c)
    # the override is used: scale 0.5 differs from the global 1.0
    b = MoELayer(cfg, None, None, 0, seed=4).double()
    b(x.clone().requires_grad_()).backward(gy)
    assert not torch.allclose(a.gate.weight.grad, b.gate.weight.grad, rtol=0, atol=1e-12)
