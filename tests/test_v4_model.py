"""DeepseekV4ForCausalLM pieces the parity tests do not cover: the registry builds it by model_type; a standalone
MTP chunk followed by a loss chunk (``mtp_in_input``) equals the whole model (V4 and V3); the output head's
stream collapse sits where the decoder stack ends; bf16 keeps the fp32 parameters fp32 and gives a sane loss;
packed sequences are refused; the initial hash tables hold distinct experts and do not depend on the layout."""
import pytest
import torch

from tests import v4_reference as R
from tests.tolerance import assert_equal


def v4_cfg(**over):
    from megatron_ascend.config import ModelConfig
    kw = dict(R.tiny_kwargs(), model_type="deepseek_v4")
    kw.update(over)
    return ModelConfig.from_hf_dict(kw)


def v3_cfg():
    from megatron_ascend.config import ModelConfig
    return ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                       num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                       num_nextn_predict_layers=2, init_method_std=0.05)


def _losses(out, mask):
    return (out["lm_loss"] * mask).sum() + sum(l.sum() for l in out["mtp_losses"])


@pytest.mark.parametrize("make", [v4_cfg, v3_cfg], ids=["v4", "v3"])
def test_standalone_mtp_chunk_then_loss_chunk_equals_whole_model(make):
    from megatron_ascend.models import build_model
    cfg = make()
    ids, labels, mask = R.data(cfg.vocab_size, b=2, s=24)
    whole = build_model(cfg, init_seed=3)
    lw = _losses(whole(ids, labels=labels, loss_mask=mask), mask)
    lw.backward()
    a = build_model(cfg, post_process=False, include_mtp=True, init_seed=3)
    b = build_model(cfg, pre_process=False, layer_ids=[], include_mtp=False, mtp_in_input=True, init_seed=3)
    assert not hasattr(b.model, "norm") and hasattr(a.model, "norm") and not hasattr(b, "mtp")
    h = a(ids)
    D = cfg.num_nextn_predict_layers
    assert h.shape[0] == (1 + D) * ids.shape[1] and h.shape[-1] == cfg.hidden_size
    h_in = h.detach().requires_grad_(True)
    b.set_input_tensor(h_in)
    lb = _losses(b(ids, labels=labels, loss_mask=mask), mask)
    lb.backward()
    h.backward(h_in.grad)
    assert_equal(lb.detach(), lw.detach(), "loss")
    grads = {n: p.grad for n, p in whole.named_parameters()}
    for part in (a, b):
        for n, p in part.named_parameters():
            if n != "model.embed_tokens.weight" and n != "lm_head.weight":
                if grads[n] is None:  # the indexer (no KL loss here) gets no gradient
                    assert p.grad is None, n
                    continue
                assert_equal(p.grad, grads[n], f"grad of {n}")
    assert_equal(a.model.embed_tokens.weight.grad, grads["model.embed_tokens.weight"], "embedding grad")
    assert_equal(b.lm_head.weight.grad, grads["lm_head.weight"], "head grad")


def test_registry_and_layout_of_the_v4_chunk():
    from megatron_ascend.config import ConfigError
    from megatron_ascend.models import build_model, model_class
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.models.deepseek_v4 import DeepseekV4ForCausalLM
    assert model_class("deepseek_v4") is DeepseekV4ForCausalLM and model_class(v3_cfg()) is DeepseekForCausalLM
    with pytest.raises(ConfigError, match="model_type"):
        model_class("llama")
    cfg = v4_cfg()
    first = build_model(cfg, post_process=False, layer_ids=[0, 1])
    last = build_model(cfg, pre_process=False, layer_ids=[2, 3, 4])
    assert not hasattr(first.model, "hc_head") and hasattr(last.model, "hc_head") and hasattr(last, "mtp")
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    h = first(ids)
    assert h.shape == (24, 2, cfg.hc_mult * cfg.hidden_size)  # the streams cross the stage boundary
    # an unpacked SFT sample (one conversation, then padding as segment 1) is the plain sequence for its tokens
    seg = torch.zeros_like(ids)
    seg[:, 20:] = 1
    whole = build_model(cfg)
    mask = torch.ones(2, 24)
    mask[:, 20:] = 0
    out = whole(ids, labels=ids, loss_mask=mask, segment_ids=seg)
    ref = whole(ids, labels=ids, loss_mask=mask)
    assert_equal(out["lm_loss"][:, :20], ref["lm_loss"][:, :20], "unpacked sample with padding segment")
    with pytest.raises(ValueError, match="packed"):  # a second trained sequence in the sample
        whole(ids, labels=ids, loss_mask=torch.ones(2, 24), segment_ids=seg)


def test_hash_tables_distinct_and_layout_independent():
    from megatron_ascend.models import build_model
    cfg = v4_cfg()
    a = dict(build_model(cfg, init_seed=4).named_buffers())
    b = dict(build_model(cfg, post_process=False, layer_ids=[0, 1], init_seed=4).named_buffers())
    tables = [n for n in a if n.endswith("tid2eid")]
    assert len(tables) == cfg.num_hash_layers == 2
    for n in tables:
        t = a[n]
        assert t.shape == (cfg.vocab_size, cfg.num_experts_per_tok) and t.dtype == torch.long
        assert (t.sort(-1).values.diff(dim=-1) > 0).all(), "each token needs distinct experts"
        assert_equal(b[n], t, n)
    assert not torch.equal(a[tables[0]], a[tables[1]])


def test_bf16_keeps_fp32_parameters_and_trains():
    from megatron_ascend.models import build_model
    from megatron_ascend.training.parts import _cast_keep_fp32_buffers
    cfg = v4_cfg()
    m = build_model(cfg, init_seed=2)
    _cast_keep_fp32_buffers(m, torch.bfloat16)
    fp32 = {n for n, p in m.named_parameters() if p.dtype == torch.float32}
    assert any(n.endswith("attn_hc.fn") for n in fp32) and "model.hc_head.hc_fn" in fp32
    assert "model.norm.weight" in fp32 and any(n.endswith("input_layernorm.weight") for n in fp32)
    assert "lm_head.weight" not in fp32
    ids, labels, mask = R.data(cfg.vocab_size, b=2, s=24)
    out = m(ids, labels=labels, loss_mask=mask)
    loss = (out["lm_loss"] * mask).sum() / mask.sum()
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 1.0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
