"""Activation recomputation: every setting gives bitwise the losses and gradients of no recompute (CPU fp32),
single process, across TP / SP / EP layouts on gloo, and on a 2-stage manual pipeline split; the RNG is
replayed; SavedTensorMeter shows what each setting keeps (full recompute cuts >= 80%; mla_up_proj drops q, k, v
of every attention block)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ascend.config import ConfigError
from tests.harness import run_distributed
from tests.test_model_deepseek import tiny_cfg
from tests.test_model_parity import B, S, data
from tests.tolerance import assert_close

SETTINGS = [dict(granularity="selective", modules=(m,)) for m in ("core_attn", "mla_up_proj", "layernorm", "mlp")]
SETTINGS += [dict(granularity="selective", modules=("core_attn", "mla_up_proj", "layernorm", "mlp")),
             dict(granularity="full", method="uniform", num_layers=1),
             dict(granularity="full", method="uniform", num_layers=2),
             dict(granularity="full", method="block", num_layers=1),
             dict(granularity="full", method="block", num_layers=3)]
MOE_SETTINGS = [dict(granularity="selective", modules=("moe",)),
                dict(granularity="selective", modules=("moe", "layernorm", "core_attn"))]


def _step(model, ids, labels, mask, setting, meter=False):
    from megatron_ascend.recompute import SavedTensorMeter, apply_recompute
    apply_recompute(model, **setting)
    model.zero_grad(set_to_none=True)
    m = SavedTensorMeter(model)
    with m if meter else torch.enable_grad():
        out = model(ids, labels=labels, loss_mask=mask)
        loss = (out["lm_loss"] * mask).sum() / mask.sum()
        for l, mk in zip(out["mtp_losses"], out["mtp_loss_masks"]):
            loss = loss + out["mtp_loss_scale"] * l.sum() / mk.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, m


def _check_all(model, ids, labels, mask, settings, what, scopes=None):
    l0, g0, m0 = _step(model, ids, labels, mask, dict(granularity=None), meter=True)
    out = {"none": m0.total_bytes}
    if scopes is not None:
        scopes["none"] = dict(m0.per_scope)
    for s in settings:
        l, g, m = _step(model, ids, labels, mask, s, meter=True)
        assert torch.equal(l, l0), f"{what} {s}: loss {l.item()} != {l0.item()}"
        assert g.keys() == g0.keys(), f"{what} {s}: different params got grads"
        for n in g0:
            assert torch.equal(g[n], g0[n]), f"{what} {s}: grad of {n} not bitwise equal"
        out[repr(s)] = m.total_bytes
        if scopes is not None:
            scopes[repr(s)] = dict(m.per_scope)
    return out


def _assert_up_proj_saving(cfg, scopes, what):
    """Selective mla_up_proj drops q, k, v of every attention block (rebuilt from the latents in backward):
    each decoder / MTP layer keeps at least |q| + |k| + |v| - |latents| bytes fewer than without recompute."""
    s, b = data(cfg.vocab_size)[0].shape[::-1]
    n, f = cfg.num_attention_heads, 4  # fp32
    qkv = s * b * n * (2 * cfg.qk_head_dim + cfg.v_head_dim) * f
    latents = s * b * ((cfg.q_lora_rank or cfg.hidden_size) + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * f
    none, up = scopes["none"], scopes[repr(dict(granularity="selective", modules=("mla_up_proj",)))]
    layers = [k for k in none if k not in ("other", "checkpoint")]
    assert len(layers) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers, (what, sorted(none))
    for k in layers:
        assert none[k] - up.get(k, 0) >= qkv - latents, \
            f"{what} {k}: mla_up_proj saves {none[k] - up.get(k, 0)} bytes, expected >= {qkv - latents}"


def test_single_process_bitwise_and_meter():
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    cases = [("v3 dense + MTP", tiny_cfg(num_hidden_layers=3, first_k_dense_replace=4), SETTINGS),
             ("v3.2 DSA indexer", tiny_cfg(model_type="deepseek_v32", num_hidden_layers=3, first_k_dense_replace=4,
                                          index_n_heads=4, index_head_dim=16, index_topk=4,
                                          dsa_indexer_loss_coeff=0.3), SETTINGS)]
    cases.append(("v3 MoE + MTP", tiny_cfg(num_hidden_layers=3), SETTINGS + MOE_SETTINGS))
    for what, cfg, settings in cases:
        model = DeepseekForCausalLM(cfg, init_seed=2)
        ids, labels, mask = data(cfg.vocab_size)
        scopes = {}
        b = _check_all(model, ids, labels, mask, settings, what, scopes)
        _assert_up_proj_saving(cfg, scopes, what)
        full = b[repr(dict(granularity="full", method="uniform", num_layers=1))]
        assert full <= 0.2 * b["none"], f"{what}: full recompute keeps {full / b['none']:.2%} of saved bytes"
        for s in settings:
            assert b[repr(s)] < b["none"], f"{what} {s}: saves nothing ({b[repr(s)]} vs {b['none']} bytes)"


def test_checkpoint_replays_rng_and_tracker_states():
    from megatron_ascend.tensor_parallel.random import checkpoint, get_rng_tracker, model_parallel_seed

    def fn(x):
        y = F.dropout(torch.tanh(x), 0.5, training=True)
        with get_rng_tracker().fork():
            y = F.dropout(y * 2, 0.3, training=True)
        return y.sum(-1)

    x0 = torch.randn(8, 16, dtype=torch.float64)
    res = []
    for use_ckpt in (False, True):
        model_parallel_seed(5)
        x = x0.clone().requires_grad_(True)
        y = checkpoint(fn, x) if use_ckpt else fn(x)
        after = torch.rand(3)  # the default stream continues identically
        y.backward(torch.ones_like(y))
        res.append((y.detach(), x.grad, after))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_moe_internal_modules_need_moe_support():
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.recompute import apply_recompute
    model = DeepseekForCausalLM(tiny_cfg(num_hidden_layers=2), init_seed=1)
    supported = set(getattr(model.model.layers["1"].mlp, "supports_recompute", ()))
    for m in ("moe_act", "shared_experts"):
        if m in supported:
            apply_recompute(model, granularity="selective", modules=(m,))
        else:
            with pytest.raises(ConfigError, match=m):
                apply_recompute(model, granularity="selective", modules=(m,))
    with pytest.raises(ConfigError, match="recompute-method"):
        apply_recompute(model, granularity="full", num_layers=1)


def _layouts_body(layouts, settings):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    cfg = tiny_cfg(num_hidden_layers=3)
    ids, labels, mask = data(cfg.vocab_size)
    for tp, ep, sp in layouts:
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                             sequence_parallel=sp)
        pg = initialize_model_parallel(par)
        model = DeepseekForCausalLM(cfg, par, pg, init_seed=4)
        _check_all(model, ids, labels, mask, settings, f"tp={tp} ep={ep} sp={sp}")
    return True


def test_bitwise_across_tp_ep_layouts():
    settings = [SETTINGS[4], SETTINGS[5], SETTINGS[7]] + MOE_SETTINGS
    assert all(run_distributed(4, _layouts_body, [(2, 2, True), (1, 4, False), (4, 1, True)], settings,
                               timeout=400))


def test_two_stage_split_with_recompute_equals_whole_model():
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.recompute import apply_recompute
    cfg = tiny_cfg(num_hidden_layers=4, first_k_dense_replace=5)
    ids, labels, mask = data(cfg.vocab_size)
    whole = DeepseekForCausalLM(cfg, init_seed=9)
    lw, gw, _ = _step(whole, ids, labels, mask, dict(granularity=None))
    for s0_set, s1_set in ((SETTINGS[5], SETTINGS[7]), (SETTINGS[4], SETTINGS[6])):
        s0 = DeepseekForCausalLM(cfg, layer_ids=[0, 1], post_process=False, init_seed=9)
        s1 = DeepseekForCausalLM(cfg, layer_ids=[2, 3], pre_process=False, init_seed=9)
        apply_recompute(s0, **s0_set)
        apply_recompute(s1, **s1_set)
        h = s0(ids)
        h_in = h.detach().requires_grad_(True)
        s1.set_input_tensor(h_in)
        out = s1(ids, labels=labels, loss_mask=mask)
        loss = (out["lm_loss"] * mask).sum() / mask.sum() + out["mtp_loss_scale"] * out["mtp_losses"][0].sum() / \
            out["mtp_loss_masks"][0].sum()
        loss.backward()
        h.backward(h_in.grad)
        assert torch.equal(loss.detach(), lw)
        for stage in (s0, s1):
            for n, p in stage.named_parameters():
                if n != "model.embed_tokens.weight":
                    assert torch.equal(p.grad, gw[n]), (s0_set, s1_set, n)
        emb = s0.model.embed_tokens.weight.grad + s1.model.embed_tokens.weight.grad
        # the whole model accumulates the main and the MTP use of each row itself; a row sums its tokens
        # (B * S at most) from each of the two uses
        assert_close(emb, gw["model.embed_tokens.weight"], "embedding grad summed over the two stages",
                     terms=2 * B * S)
    # the plan is per chunk: uniform groups and block prefixes come from the chunk's own layer list
    apply_recompute(s1, granularity="full", method="uniform", num_layers=1)
    assert s1.recompute_chunks == [[2], [3]]
    apply_recompute(s1, granularity="full", method="block", num_layers=1)
    assert s1.recompute_chunks == [[2]]
