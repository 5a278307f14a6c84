"""Router unit tests: every scoring function and top-k method against a direct per-token implementation of
the formulas in deepseek_architecture.md 2.2 / 6.4 (plain Python loops over tokens, float64)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_ascend.config import ModelConfig
from megatron_ascend.moe.router import TopKRouter, capacity_keep_mask, score, select_experts
from tests.tolerance import assert_close, assert_equal

E, H = 8, 16


def _direct_score(z, func):
    if func == "softmax":
        m = max(z)
        ex = [math.exp(v - m) for v in z]
        return [v / sum(ex) for v in ex]
    if func == "sigmoid":
        return [1 / (1 + math.exp(-v)) for v in z]
    return [math.sqrt(math.log1p(math.exp(v))) for v in z]


def _topk(vals, k, allowed=None):
    cand = [i for i in range(len(vals)) if allowed is None or i in allowed]
    return sorted(cand, key=lambda i: -vals[i])[:k]


def _direct_route(z, bias, func, method, k, n_group, topk_group, norm, scale):
    """One token: returns {expert: weight}."""
    s = _direct_score(z, func)
    choice = [a + (bias[i] if method == "noaux_tc" else 0.0) for i, a in enumerate(s)]
    per = len(s) // n_group
    allowed = None
    if method != "greedy" and n_group > 1:
        gscore = []
        for g in range(n_group):
            block = sorted(choice[g * per:(g + 1) * per], reverse=True)
            gscore.append(block[0] if method == "group_limited_greedy" else block[0] + block[1])
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        allowed = {g * per + j for g in keep for j in range(per)}
    idx = _topk(choice, k, allowed)
    w = [s[i] for i in idx]
    if method in ("greedy", "group_limited_greedy"):
        w = [v / (sum(w) + 1e-20) for v in w] if (norm and k > 1) else [v * scale for v in w]
    else:
        if norm:
            w = [v / (sum(w) + 1e-20) for v in w]
        w = [v * scale for v in w]
    return dict(zip(idx, w))


def _cfg(**kw):
    base = dict(vocab_size=32, hidden_size=H, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, n_routed_experts=E, n_shared_experts=0, num_experts_per_tok=2,
                q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                first_k_dense_replace=0)
    base.update(kw)
    return ModelConfig(**base)


CASES = [
    dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=1.0),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
         norm_topk_prob=False, routed_scaling_factor=16.0, num_experts_per_tok=3),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
         routed_scaling_factor=2.5, num_experts_per_tok=3),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=False,
         routed_scaling_factor=2.5),
    dict(scoring_func="sqrtsoftplus", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
         routed_scaling_factor=1.5),
    dict(scoring_func="sigmoid", topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=1.0,
         num_experts_per_tok=1),
    dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, norm_topk_prob=True,
         routed_scaling_factor=2.5, num_experts_per_tok=E),  # top-k = all experts
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['scoring_func']}-{c['topk_method']}-k{c.get('num_experts_per_tok', 2)}")
def test_router_matches_direct_formulas(case):
    cfg = _cfg(**case)
    torch.manual_seed(0)
    r = TopKRouter(cfg, layer_idx=0).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(40, H, dtype=torch.float64)
    w, idx, scores, logits = r(x)
    assert idx.shape == (40, cfg.num_experts_per_tok) and w.dtype == torch.float64
    bias = r.e_score_correction_bias.tolist() if r.e_score_correction_bias is not None else [0.0] * E
    for t in range(40):
        z = logits[t].tolist()
        # fp64 vs Python math: a softmax sums E exponentials; sigmoid / sqrt-softplus are elementwise
        assert_close(scores[t], torch.tensor(_direct_score(z, cfg.scoring_func), dtype=torch.float64),
                     f"scores of token {t}", terms=E)
        want = _direct_route(z, bias, cfg.scoring_func, cfg.topk_method, cfg.num_experts_per_tok, cfg.n_group,
                             cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        got = dict(zip(idx[t].tolist(), w[t].tolist()))
        assert set(got) == set(want), (t, got, want)
        ids = sorted(want)  # weights: the scores renormalised over the top k (<= E) and scaled
        assert_close(torch.tensor([got[e_] for e_ in ids], dtype=torch.float64),
                     torch.tensor([want[e_] for e_ in ids], dtype=torch.float64), f"weights of token {t}", terms=E)


def test_bias_changes_selection_but_not_weights():
    cfg = _cfg(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False, routed_scaling_factor=1.0)
    r = TopKRouter(cfg, 0)
    torch.manual_seed(1)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        r.e_score_correction_bias.zero_()
        r.e_score_correction_bias[5] = 10.0  # every token now picks expert 5
    x = torch.randn(20, H)
    w, idx, scores, _ = r(x)
    assert (idx == 5).any(dim=1).all()
    pos = (idx == 5).float().argmax(1)
    assert_equal(w.gather(1, pos[:, None]).squeeze(1), scores[:, 5], "weight = unbiased score")  # gathered, x 1.0


def test_hash_routing_uses_table_and_gate_weights():
    cfg = _cfg(scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
               num_hash_layers=1)
    r = TopKRouter(cfg, 0, hash_layer=True)
    assert "tid2eid" in dict(r.named_buffers()) and r.e_score_correction_bias is None
    torch.manual_seed(2)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        r.tid2eid.copy_(torch.stack([torch.randperm(E)[:2] for _ in range(cfg.vocab_size)]))
    ids = torch.randint(0, cfg.vocab_size, (12,))
    x = torch.randn(12, H)
    w, idx, scores, logits = r(x, ids)
    assert torch.equal(idx, r.tid2eid[ids])
    s = torch.nn.functional.softplus(logits).sqrt()
    ws = s.gather(1, idx)
    assert_close(w, ws / ws.sum(-1, keepdim=True) * 1.5, "hash-routed weights", terms=2)  # normalised over k = 2
    with pytest.raises(ValueError, match="input_ids"):
        r(x)


def test_router_stays_fp32_under_bf16_and_computes_in_fp32():
    r = TopKRouter(_cfg(scoring_func="sigmoid", topk_method="noaux_tc"), 0).to(torch.bfloat16)
    assert r.weight.dtype == torch.float32 and r.e_score_correction_bias.dtype == torch.float32
    torch.nn.init.normal_(r.weight, 0, 0.5)
    w, idx, scores, logits = r(torch.randn(4, H, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and w.dtype == torch.float32


def test_score_rejects_unknown_function():
    with pytest.raises(ValueError, match="sqrtsoftplus"):
        score(torch.zeros(2, 2), "relu")


def test_group_selection_never_leaves_kept_groups():
    torch.manual_seed(3)
    s = torch.rand(200, E)
    for method in ("group_limited_greedy", "noaux_tc"):
        idx = select_experts(s, 2, method, n_group=4, topk_group=1)
        assert (idx // 2 == idx[:, :1] // 2).all()  # one group of 2 experts kept -> both from it


def test_capacity_keeps_highest_weight_assignments_per_expert():
    torch.manual_seed(4)
    t, k = 30, 2
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(t)])
    idx[:20, 0] = 3  # overload expert 3
    w = torch.rand(t, k)
    cf = 1.0
    keep = capacity_keep_mask(idx, w, E, cf)
    cap = math.ceil(t * k / E * cf)
    for e_ in range(E):
        sel = idx == e_
        ws = sorted(w[sel].tolist(), reverse=True)
        kept = sorted(w[sel & keep].tolist(), reverse=True)
        assert kept == ws[:cap]
    assert (~keep).sum() > 0


def test_config_rejects_bad_moe_options():
    from megatron_ascend.config import ConfigError
    from megatron_ascend.moe import MoELayer
    with pytest.raises(ConfigError, match="load_balancing_type"):
        MoELayer(dataclasses.replace(_cfg(), moe_router_load_balancing_type="sinkhorn"), None, None, 0)
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoELayer(dataclasses.replace(_cfg(), moe_expert_capacity_factor=0.0), None, None, 0)
