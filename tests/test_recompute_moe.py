"""Selective recompute inside the MoE block (``moe_act``, ``shared_experts``): bitwise the losses and every gradient
of no recompute (CPU fp32), single process and on 4 gloo ranks (TP2+SP+EP2, EP4), alone and combined with the
other selective modules; routing counts and logged aux values are not counted twice; SavedTensorMeter shows
``moe_act`` drops exactly the SwiGLU intermediates and ``shared_experts`` the shared-expert internals."""
import torch

from tests.harness import run_distributed
from tests.test_model_deepseek import tiny_cfg
from tests.test_model_parity import B, S, data
from tests.test_recompute import _check_all, _step

SEL = ("core_attn", "mla_up_proj", "layernorm", "mlp")
MOE_INNER = [dict(granularity="selective", modules=("moe_act",)),
             dict(granularity="selective", modules=("shared_experts",)),
             dict(granularity="selective", modules=("moe_act", "shared_experts")),
             dict(granularity="selective", modules=SEL + ("moe_act",)),
             dict(granularity="selective", modules=SEL + ("moe_act", "shared_experts")),
             dict(granularity="selective", modules=("moe", "moe_act", "shared_experts"))]


def _cfg():
    # z-loss on as well, so both aux-loss paths run under recompute
    return tiny_cfg(num_hidden_layers=3, moe_z_loss_coeff=1e-3)


def _routers(model):
    from megatron_ascend.moe.router import TopKRouter
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _reset_stats(model):
    for r in _routers(model):
        r.local_tokens_per_expert.zero_()
        r.stat_tokens_per_expert.zero_()
        r.stat_dropped.zero_()
        r.aux_values, r.aux_calls = {}, 0


def _stats(model):
    return [(r.local_tokens_per_expert.clone(), r.stat_tokens_per_expert.clone(), r.stat_dropped.clone(),
             dict(r.aux_values), r.aux_calls) for r in _routers(model)]


def _check_stats_once(model, ids, labels, mask, settings, what):
    """Each setting's step leaves the same routing counts / aux values as one step without recompute."""
    _reset_stats(model)
    _step(model, ids, labels, mask, dict(granularity=None))
    ref = _stats(model)
    assert ref and all(s[4] == 1 and s[3] for s in ref), f"{what}: the reference step logged no aux values"
    for s in settings:
        _reset_stats(model)
        _step(model, ids, labels, mask, s)
        for a, b in zip(_stats(model), ref):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), (what, s)
            assert a[3] == b[3] and a[4] == b[4], f"{what} {s}: aux values {a[3]} x{a[4]} != {b[3]} x{b[4]}"


def _flags(model):
    out = []
    for layer in model.modules():
        if hasattr(layer, "supports_recompute"):
            sh = layer.shared_experts
            out.append((layer.experts.recompute_act, sh.recompute_act if sh is not None else None))
    return out


def test_single_process_bitwise_stats_and_flags():
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.recompute import apply_recompute
    cfg = _cfg()
    model = DeepseekForCausalLM(cfg, init_seed=2)
    ids, labels, mask = data(cfg.vocab_size)
    _check_all(model, ids, labels, mask, MOE_INNER, "single")
    _check_stats_once(model, ids, labels, mask, MOE_INNER, "single")  # [5] re-runs the router in backward
    # what reaches the experts: both modules' activations under moe_act; the shared one only if not checkpointed
    apply_recompute(model, granularity="selective", modules=("moe_act",))
    assert set(_flags(model)) == {(True, True)}
    apply_recompute(model, granularity="selective", modules=("moe_act", "shared_experts"))
    assert set(_flags(model)) == {(True, False)}
    apply_recompute(model, granularity="selective", modules=("moe", "moe_act"))  # subsumed by the block checkpoint
    assert set(_flags(model)) == {(False, False)}
    assert all(l.mlp.recompute_modules == frozenset() for l in model.model.layers.values() if l.is_moe)
    apply_recompute(model, granularity=None)
    assert set(_flags(model)) == {(False, False)}


def test_meter_moe_act_drops_exactly_the_swiglu_intermediates():
    """Per MoE layer (decoder and MTP), moe_act drops silu(gate) and the activation, [rows, I] each, for the routed
    rows (tokens * top-k, dropless) and the shared expert's tokens; dense layers are unchanged. shared_experts drops
    the shared MLP's internals; both together drop more than either."""
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    cfg = _cfg()
    model = DeepseekForCausalLM(cfg, init_seed=3)
    ids, labels, mask = data(cfg.vocab_size)
    meters = {}
    for name, mods in (("none", None), ("act", ("moe_act",)), ("shared", ("shared_experts",)),
                       ("both", ("moe_act", "shared_experts"))):
        s = dict(granularity=None) if mods is None else dict(granularity="selective", modules=mods)
        meters[name] = _step(model, ids, labels, mask, s, meter=True)[2].per_scope
    n_tok, inter, k = B * S, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    width = cfg.n_shared_experts * inter
    per_layer = 2 * 4 * n_tok * (k * inter + width)  # fp32: silu(gate) + act, routed and shared
    none, act = meters["none"], meters["act"]
    moe_scopes = [f"layer.{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)] + ["mtp.0"]
    assert set(moe_scopes) <= set(none), (moe_scopes, sorted(none))
    for sc in moe_scopes:
        assert none[sc] - act[sc] == per_layer, f"{sc}: moe_act saved {none[sc] - act[sc]} bytes, not {per_layer}"
    for sc in none:
        if sc not in moe_scopes:
            assert act[sc] == none[sc], f"{sc}: moe_act changed a non-MoE scope"
    tot = {n: sum(m.values()) for n, m in meters.items()}
    assert tot["act"] < tot["none"] and tot["shared"] < tot["none"]
    assert tot["both"] < min(tot["act"], tot["shared"]), tot
    # the shared expert's gate, up, silu(gate), act ([tokens, W] each) are gone under shared_experts
    for sc in moe_scopes:
        assert none[sc] - meters["shared"][sc] >= 4 * 4 * n_tok * width, sc


def test_swiglu_then_and_grouped_experts_float64_padded_path():
    """The helper directly: float64 (padded-bmm grouped matmul), a clamp limit, an expert with zero rows, views of
    the activation (3-d linear); bitwise equal values and grads with and without recompute."""
    from megatron_ascend.moe.experts import GroupedExperts, SharedExperts, swiglu_then
    torch.manual_seed(0)
    ge = GroupedExperts(16, 12, 4, 0, 1, 0, 1, 1, swiglu_limit=0.7).double()
    sh = SharedExperts(16, 8, 0, 1, 1, swiglu_limit=0.7).double()
    for p in list(ge.parameters()) + list(sh.parameters()):
        torch.nn.init.normal_(p, std=0.5)
    x0 = torch.randn(9, 16, dtype=torch.float64)
    xs0 = torch.randn(3, 2, 16, dtype=torch.float64)
    counts = [4, 0, 3, 2]
    res = []
    for rec in (False, True):
        ge.recompute_act = sh.recompute_act = rec
        for p in list(ge.parameters()) + list(sh.parameters()):
            p.grad = None
        x, xs = x0.clone().requires_grad_(True), xs0.clone().requires_grad_(True)
        y = ge(x, counts)
        ys = sh(xs)
        (y.square().sum() + ys.pow(3).sum()).backward()
        res.append([y.detach(), ys.detach(), x.grad, xs.grad] + [p.grad for p in ge.parameters()] +
                   [p.grad for p in sh.parameters()])
    for a, b in zip(*res):
        assert torch.equal(a, b)
    # no grad: plain call, nothing checkpointed
    with torch.no_grad():
        out = swiglu_then(x0, x0, 0.0, lambda a: a * 2, recompute=True)
    assert torch.equal(out, torch.nn.functional.silu(x0) * x0 * 2)


def _layouts_body(layouts, settings):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    cfg = _cfg()
    ids, labels, mask = data(cfg.vocab_size)
    for tp, ep, sp in layouts:
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                             sequence_parallel=sp)
        pg = initialize_model_parallel(par)
        model = DeepseekForCausalLM(cfg, par, pg, init_seed=4)
        what = f"tp={tp} ep={ep} sp={sp}"
        _check_all(model, ids, labels, mask, settings, what)
        _check_stats_once(model, ids, labels, mask, settings[:1], what)
    return True


def test_bitwise_across_tp_sp_ep_layouts():
    settings = [MOE_INNER[0], MOE_INNER[1], MOE_INNER[4]]
    assert all(run_distributed(4, _layouts_body, [(2, 2, True), (1, 4, False), (2, 2, False)], settings,
                               timeout=400))
