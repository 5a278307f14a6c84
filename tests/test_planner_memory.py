"""Planner activation estimate vs the bytes autograd really saves (recompute.SavedTensorMeter) on tiny
DeepSeek-V3 models: per decoder layer (dense, MoE) and for the whole forward, without recompute, with selective
recompute of each module the planner models, and with full recompute; within 10 %.

The filter below drops storages that belong to a parameter (transposed weight views saved by matmuls); the
meter now does the same itself, so the filter is a no-op kept as a guard."""
import pytest
import torch

from megatron_ascend.config import ModelConfig
from megatron_ascend.planner.memory import (SELECTIVE_MODULES, ActivationOptions, embedding_activation_bytes,
                                            head_activation_bytes, layer_activation_bytes)

CFGS = {
    "h64": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1,
                       max_position_embeddings=512),
    "h96_v2lite": ModelConfig(vocab_size=300, hidden_size=96, intermediate_size=160, moe_intermediate_size=24,
                              num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=6,
                              n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=3, q_lora_rank=None,
                              kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                              num_nextn_predict_layers=0, max_position_embeddings=512),
}
RECOMPUTE = {
    "none": ({}, "none", ()),
    "selective": (dict(granularity="selective", modules=SELECTIVE_MODULES), "selective", SELECTIVE_MODULES),
    "selective_core_norm": (dict(granularity="selective", modules=("core_attn", "layernorm")), "selective",
                            ("core_attn", "layernorm")),
    "selective_shared": (dict(granularity="selective", modules=("shared_experts", "mla_up_proj")), "selective",
                         ("shared_experts", "mla_up_proj")),
    "selective_mlp_moe": (dict(granularity="selective", modules=("mlp", "moe")), "selective", ("mlp", "moe")),
    "full": (dict(granularity="full", method="uniform", num_layers=1), "full", ()),
}


def _meter_class():
    from megatron_ascend.recompute import SavedTensorMeter

    class ActivationsOnly(SavedTensorMeter):
        def __init__(self, model):
            super().__init__(model)
            self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def record(self, t, kept_by_checkpoint=False):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self._param_storages:
                return
            super().record(t, kept_by_checkpoint)

    return ActivationsOnly


@pytest.mark.parametrize("rc", list(RECOMPUTE))
@pytest.mark.parametrize("name", list(CFGS))
def test_activation_estimate_within_10_percent(name, rc):
    from megatron_ascend.models.deepseek.model import DeepseekForCausalLM
    from megatron_ascend.recompute import apply_recompute
    cfg = CFGS[name]
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    kw, mode, mods = RECOMPUTE[rc]
    apply_recompute(model, **kw)
    s, b = 96, 2
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with _meter_class()(model) as meter:
        model(ids, labels=ids, loss_mask=torch.ones(b, s))
    # CPU SDPA takes its flash kernel when q/k and v head dims agree, the math kernel (s x s probs) otherwise
    flash = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim == cfg.v_head_dim
    o = ActivationOptions(seq_length=s, micro_batch_size=b, act_bytes=4, flash_attention=flash,
                          recompute=mode, selective_modules=mods)
    est_layers = {f"layer.{i}": layer_activation_bytes(cfg, i, o) for i in range(cfg.num_hidden_layers)}
    D = cfg.num_nextn_predict_layers
    est_total = (sum(est_layers.values()) + D * layer_activation_bytes(cfg, cfg.num_hidden_layers, o, True)
                 + head_activation_bytes(cfg, o, cfg.vocab_size, D) + embedding_activation_bytes(o, cfg))
    measured = dict(meter.per_scope)
    if mode != "full":
        for scope, est in est_layers.items():
            assert measured[scope] == pytest.approx(est, rel=0.10), (scope, measured[scope], est)
    else:  # only each layer's input is kept (attributed to the checkpoint scope)
        ck = measured.get("checkpoint", 0)
        assert ck == pytest.approx(sum(est_layers.values()) + D * layer_activation_bytes(
            cfg, cfg.num_hidden_layers, o, True), rel=0.10)
    assert meter.total_bytes == pytest.approx(est_total, rel=0.10), (measured, est_total)
