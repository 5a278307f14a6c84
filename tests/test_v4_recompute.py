"""Recomputation on DeepSeek-V4 (recompute.apply_recompute): full (uniform / block, with the MTP depth) and every
selective module V4 has (layernorm, mhc, moe, moe_act, shared_experts, core_attn, mla_up_proj) give bitwise the
losses and gradients of no recompute (indexer KL loss on, MTP on); each selective module keeps fewer bytes
for backward than none; a module V4 does not have (mlp) -- or V3 does not have (mhc) -- is one ConfigError."""
import pytest

from tests import v4_reference as R
from tests.tolerance import assert_equal

SETTINGS = [
    dict(granularity="full", method="uniform", num_layers=2),
    dict(granularity="full", method="block", num_layers=1),
    dict(granularity="selective", modules=("layernorm",)),
    dict(granularity="selective", modules=("mhc",)),
    dict(granularity="selective", modules=("moe",)),
    dict(granularity="selective", modules=("moe_act", "shared_experts")),
    dict(granularity="selective", modules=("core_attn",)),
    dict(granularity="selective", modules=("mla_up_proj",)),
    dict(granularity="selective", modules=("layernorm", "mhc", "moe_act", "core_attn", "mla_up_proj")),
]


def v4_cfg(**over):
    from megatron_ascend.config import ModelConfig
    kw = dict(R.tiny_kwargs(), model_type="deepseek_v4", dsa_indexer_loss_coeff=0.1, aux_loss_alpha=0.01)
    kw.update(over)
    return ModelConfig.from_hf_dict(kw)


def _step(model, ids, labels, mask, setting):
    from megatron_ascend.recompute import SavedTensorMeter, apply_recompute
    from megatron_ascend.moe import set_aux_loss_scale
    set_aux_loss_scale(1.0)
    apply_recompute(model, **setting)
    model.zero_grad(set_to_none=True)
    meter = SavedTensorMeter(model)
    with meter:
        out = model(ids, labels=labels, loss_mask=mask)
    loss = ((out["lm_loss"] * mask).sum() + out["mtp_loss_scale"] * out["mtp_losses"][0].sum()) / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meter


def test_v4_recompute_is_bitwise_and_saves_memory():
    from megatron_ascend.models import build_model
    cfg = v4_cfg()
    model = build_model(cfg, init_seed=5)
    ids, labels, mask = R.data(cfg.vocab_size, b=2, s=24)
    l0, g0, m0 = _step(model, ids, labels, mask, dict(granularity=None))
    assert any(".indexer." in n for n in g0), "the indexer KL loss should train the indexer here"
    for setting in SETTINGS:
        l1, g1, m1 = _step(model, ids, labels, mask, setting)
        assert_equal(l1, l0, f"loss {setting}")
        assert sorted(g1) == sorted(g0), setting
        for n in g0:
            assert_equal(g1[n], g0[n], f"grad of {n} {setting}")
        if setting["granularity"] == "selective":
            assert m1.layer_bytes < m0.layer_bytes, (setting, m1.layer_bytes, m0.layer_bytes)


def test_modules_a_model_does_not_have_are_refused():
    from megatron_ascend.config import ConfigError, ModelConfig
    from megatron_ascend.models import build_model
    from megatron_ascend.recompute import apply_recompute
    v4 = build_model(v4_cfg())
    with pytest.raises(ConfigError, match="mlp"):
        apply_recompute(v4, granularity="selective", modules=("mlp",))
    v3 = build_model(ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                                 moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                 v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 first_k_dense_replace=1))
    with pytest.raises(ConfigError, match="mhc"):
        apply_recompute(v3, granularity="selective", modules=("mhc",))
