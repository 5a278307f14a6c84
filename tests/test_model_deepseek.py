"""DeepseekForCausalLM beyond logits parity: the MTP loss and the DSA indexer KL loss against references built
from transformers' pieces on the same weights; expert-parallel layouts; layout-independent initialisation
(TP / EP / PP gathered bitwise equal); packed segments equal separate sequences; a 2-stage manual pipeline
split equals the whole model."""
import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.test_model_parity import (B, S, REL, YARN, _common, build_hf, data, pack, unpack, _gather_logits,
                                     compare_model, build_ours)
from tests.tolerance import assert_close, assert_equal, assert_rel


def _shift(t, k, fill):
    out = torch.full_like(t, fill)
    out[:, : t.shape[1] - k] = t[:, k:]
    return out


def _causal4d(s):
    return torch.full((s, s), float("-inf")).triu(1)[None, None]


# ------------------------------------------------------------------------------------------------------------
# references built in the parent from transformers modules
# ------------------------------------------------------------------------------------------------------------
def mtp_reference():
    """V3 with one MTP depth whose block is a MoE layer; the MTP module is assembled from transformers'
    DeepseekV3DecoderLayer / DeepseekV3RMSNorm and a Linear, named as the HF checkpoint names layer L."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm
    from megatron_ascend.models.deepseek import model_config_for_hf
    kw = _common(first_k_dense_replace=1, rope_parameters=YARN, num_nextn_predict_layers=1)
    cfg_hf, hf = build_hf("DeepseekV3Config", kw)
    L, h = cfg_hf.num_hidden_layers, cfg_hf.hidden_size
    torch.manual_seed(5)
    parts = torch.nn.ModuleDict({"enorm": DeepseekV3RMSNorm(h, cfg_hf.rms_norm_eps),
                                 "hnorm": DeepseekV3RMSNorm(h, cfg_hf.rms_norm_eps),
                                 "eh_proj": torch.nn.Linear(2 * h, h, bias=False),
                                 "block": DeepseekV3DecoderLayer(cfg_hf, L),
                                 "shared_norm": DeepseekV3RMSNorm(h, cfg_hf.rms_norm_eps)}).float()
    with torch.no_grad():
        for n, p in parts.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0, p.shape[-1] ** -0.5)
        parts["block"].mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(cfg_hf.n_routed_experts))
    V = cfg_hf.vocab_size
    ids, labels, mask = data(V)
    hs = hf.model(input_ids=ids).last_hidden_state
    logits = hf.lm_head(hs)
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S)
    emb = hf.model.embed_tokens(_shift(ids, 1, 0))
    x = parts["eh_proj"](torch.cat([parts["enorm"](emb), parts["hnorm"](hs)], -1))
    pos = torch.arange(S)[None].expand(B, S)
    pe = hf.model.rotary_emb(x, pos)
    y = parts["block"](x, attention_mask=_causal4d(S), position_embeddings=pe, position_ids=pos)
    mlogits = hf.lm_head(parts["shared_norm"](y))
    mask1 = _shift(mask, 1, 0.0)
    mtok = F.cross_entropy(mlogits.reshape(-1, V), _shift(labels, 1, 0).reshape(-1), reduction="none").view(B, S)
    mtok = mtok * mask1
    loss = (tok * mask).sum() / mask.sum() + 0.1 * mtok.sum() / mask1.sum()
    loss.backward()
    pre = f"model.layers.{L}."
    names = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
             "shared_norm.weight": "shared_head.norm.weight"}
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    for n, p in parts.named_parameters():
        hn = pre + (n[len("block."):] if n.startswith("block.") else names[n])
        sd[hn] = p.detach().clone()
        grads[hn] = p.grad.detach().clone()
    for n, b_ in parts["block"].named_buffers():
        sd[pre + n] = b_.detach().clone()
    return pack(dict(cfg=model_config_for_hf(cfg_hf, aux_loss_alpha=0.0), sd=sd, ids=ids, labels=labels,
                     mask=mask, logits=logits.detach(), tok=tok.detach(), loss=loss.item(), mtok=mtok.detach(),
                     grads=grads))


def indexer_reference(coeff=0.5):
    """V3.2 (dense layers): the KL(main attention || indexer) loss of every layer, hand-written from the paper
    with transformers' indexer weights and RoPE, and its gradient wrt the indexer weights."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
    from megatron_ascend.models.deepseek import model_config_for_hf
    kw = _common(first_k_dense_replace=2, rope_parameters=YARN, index_n_heads=4, index_head_dim=16, index_topk=5)
    cfg_hf, hf = build_hf("DeepseekV32Config", kw)
    V = cfg_hf.vocab_size
    ids, labels, mask = data(V)
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: inputs.__setitem__(i, kwargs["hidden_states"].detach()), with_kwargs=True)
        for i, layer in enumerate(hf.model.layers)]
    out = hf(input_ids=ids, output_attentions=True)
    for hk in hooks:
        hk.remove()
    pos = torch.arange(S)[None].expand(B, S)
    total = 0.0
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for i, layer in enumerate(hf.model.layers):
        att, ix = layer.self_attn, layer.self_attn.indexer
        x = inputs[i]
        cos, sin = hf.model.rotary_emb(x, pos)
        c_q = att.q_a_layernorm(att.q_a_proj(x)).detach()
        q = ix.wq_b(c_q).view(B, S, ix.n_heads, ix.head_dim)
        q_rot, q_pass = q.split([ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
        k = ix.k_norm(ix.wk(x)).unsqueeze(2)
        k_rot, k_pass = k.split([ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q, k = torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1).squeeze(2)
        scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k) * ix.head_dim ** -0.5)
        w = ix.weights_proj(x) * ix.n_heads ** -0.5
        index = torch.einsum("bsh,bsht->bst", w, scores)
        top = index.detach().masked_fill(~causal, float("-inf")).topk(min(ix.index_topk, S), -1).indices
        sel = torch.zeros(B, S, S, dtype=torch.bool).scatter_(-1, top, True) & causal
        p = out.attentions[i].detach().sum(1)
        p = p / p.sum(-1, keepdim=True)
        logq = index.masked_fill(~sel, float("-inf")).log_softmax(-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq.masked_fill(p <= 0, 0.0)), torch.zeros_like(p))
        total = total + kl.sum(-1).mean()
    (coeff * total).backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None and ".indexer." in n}
    assert len(grads) == 5 * cfg_hf.num_hidden_layers  # wq_b, wk, k_norm.{weight,bias}, weights_proj
    return pack(dict(cfg=model_config_for_hf(cfg_hf, aux_loss_alpha=0.0, dsa_indexer_loss_coeff=coeff),
                     sd={k: v.detach().clone() for k, v in hf.state_dict().items()}, ids=ids, labels=labels,
                     mask=mask, kl=total.item(), grads=grads))


def _compare_grads(model, pg, grads, what, only=None):
    from megatron_ascend.models.deepseek.hf_names import hf_tensor_for
    from megatron_ascend.tensor_parallel import allreduce_sequence_parallel_grads, gather_full
    allreduce_sequence_parallel_grads(model.parameters(), pg)
    n = 0
    for name, p in model.named_parameters():
        if only is not None and only not in name:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        full = gather_full(g, p, pg) if pg is not None else g
        ref = hf_tensor_for(name, grads.get, model.config)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            full = full[: model.config.vocab_size]
        assert_rel(full, ref, REL, f"{what}: grad of {name}")
        n += 1
    return n


def _heads_body(mtp_packed, idx_packed, sp_list):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    counts = []
    mref, iref = unpack(mtp_packed), unpack(idx_packed)
    for sp in sp_list:
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=n, sequence_parallel=sp)
        pg = initialize_model_parallel(par)
        # MTP: per-token loss and every gradient (main + mtp.*) of main + 0.1 * MTP loss
        m = build_ours(mref, pg, par, include_mtp=True)
        assert "mtp.layers.0.eh_proj.weight" in dict(m.named_parameters())
        out = m(mref["ids"], labels=mref["labels"], loss_mask=mref["mask"])
        assert out["mtp_loss_scale"] == pytest.approx(0.1)
        assert_rel(out["mtp_losses"][0], mref["mtok"], REL, f"MTP per-token loss (tp={n} sp={sp})")
        m1 = out["mtp_loss_masks"][0]
        assert m1[:, -1].abs().max() == 0
        loss = (out["lm_loss"] * mref["mask"]).sum() / mref["mask"].sum() + \
            out["mtp_loss_scale"] * out["mtp_losses"][0].sum() / m1.sum()
        assert_rel(loss.item(), mref["loss"], REL, f"main + MTP loss (tp={n} sp={sp})")
        loss.backward()
        counts.append(_compare_grads(m, pg, mref["grads"], f"MTP tp={n} sp={sp}"))
        # DSA indexer: KL value and the indexer-weight gradients (attached with coeff; the LM loss gives none)
        m = build_ours(iref, pg, par)
        out = m(iref["ids"], labels=iref["labels"], loss_mask=iref["mask"])
        assert_rel(out["indexer_loss"].item(), iref["kl"], REL, f"indexer KL loss (tp={n} sp={sp})")
        ((out["lm_loss"] * iref["mask"]).sum() / iref["mask"].sum()).backward()
        counts.append(_compare_grads(m, pg, iref["grads"], f"indexer tp={n} sp={sp}", only=".indexer."))
    return counts


@pytest.fixture(scope="module")
def head_refs():
    return mtp_reference(), indexer_reference()


@pytest.mark.parametrize("tp,sp_list", [(1, [False]), (2, [False, True])])
def test_mtp_and_indexer_losses_match_references(head_refs, tp, sp_list):
    counts = run_distributed(tp, _heads_body, *head_refs, sp_list, timeout=300)[0]
    assert all(c >= 8 for c in counts), counts


# ------------------------------------------------------------------------------------------------------------
# expert-parallel layouts equal transformers (same data on every rank)
# ------------------------------------------------------------------------------------------------------------
def _ep_body(refs, layouts):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    done = []
    for tp, ep, sp, etp in layouts:
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                             sequence_parallel=sp, expert_tensor_parallel_size=etp)
        pg = initialize_model_parallel(par)
        for name, packed in refs:
            ref = unpack(packed)
            m = build_ours(ref, pg, par)
            k = compare_model(m, pg, ref, f"{name} tp={tp} ep={ep} sp={sp} etp={etp}")
            assert k >= 20
            done.append((name, tp, ep, sp))
    return done


def test_expert_parallel_layouts_match_transformers():
    from tests.test_model_parity import references
    refs = [r for r in references(True) if r[0] in ("v3_yarn", "v2_lite")]
    layouts = [(1, 4, False, 1), (2, 2, True, 2), (2, 2, True, 1)]
    done = run_distributed(4, _ep_body, refs, layouts, timeout=300)[0]
    assert len(done) == len(refs) * len(layouts)


# ------------------------------------------------------------------------------------------------------------
# layout-independent initialisation, packed segments, 2-stage split
# ------------------------------------------------------------------------------------------------------------
def tiny_cfg(**kw):
    from megatron_ascend.config import ModelConfig
    d = dict(model_type="deepseek_v3", vocab_size=250, hidden_size=64, intermediate_size=128,
             moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
             kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
             num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=dict(factor=4.0,
             original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0))
    d.update(kw)
    return ModelConfig(**d)


def _init_body(layouts):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.tensor_parallel import gather_full
    n = dist.get_world_size()
    cfg = tiny_cfg()
    full = dict(DeepseekForCausalLM(cfg, init_seed=7).named_parameters())
    checked = 0
    for tp, ep in layouts:
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        pg = initialize_model_parallel(par)
        m = DeepseekForCausalLM(cfg, par, pg, init_seed=7)
        for name, p in m.named_parameters():
            g = gather_full(p.data, p, pg)
            ref = full[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                assert g[cfg.vocab_size:].abs().max().item() == 0 if g.shape[0] > cfg.vocab_size else True
                g = g[: cfg.vocab_size]
            assert_equal(g, ref, f"{name} at tp={tp} ep={ep}")  # the same generator draws, sliced
            checked += 1
    # pipeline chunks hold a subset of the same names with the same values
    for lids, pre, post in (([0], True, False), ([1], False, True)):
        chunk = DeepseekForCausalLM(cfg, layer_ids=lids, pre_process=pre, post_process=post, init_seed=7)
        for name, p in chunk.named_parameters():
            assert_equal(p.data, full[name].data, f"{name} in the chunk holding layers {lids}")
            checked += 1
    return checked


def test_initialisation_is_layout_independent():
    assert run_distributed(4, _init_body, [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2)], timeout=300)[0] > 100


def _segments_body():
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.parallel_state import initialize_model_parallel
    n = dist.get_world_size()
    for cfg in (tiny_cfg(first_k_dense_replace=2), tiny_cfg(model_type="deepseek_v32", first_k_dense_replace=2,
                                                          index_n_heads=4, index_head_dim=16, index_topk=3)):
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=n, sequence_parallel=True)
        pg = initialize_model_parallel(par)
        packed = DeepseekForCausalLM(cfg, par, pg, init_seed=3)
        single = DeepseekForCausalLM(cfg, init_seed=3)
        g = torch.Generator().manual_seed(0)
        a, b2 = torch.randint(0, 250, (1, 5), generator=g), torch.randint(0, 250, (1, 7), generator=g)
        ids = torch.cat([a, b2], 1)
        seg = torch.tensor([[0] * 5 + [1] * 7])
        pos = torch.tensor([list(range(5)) + list(range(7))])
        with torch.no_grad():
            lp = _gather_logits(packed(ids, position_ids=pos, segment_ids=seg), pg, cfg.vocab_size)
            la = single(a).transpose(0, 1)[..., : cfg.vocab_size]
            lb = single(b2).transpose(0, 1)[..., : cfg.vocab_size]
        # the same math with other sums (softmax over 12 masked keys vs 5 / 7, TP all-reduces) through the whole
        # forward: the whole-model figure
        assert_rel(lp[:, :5], la, REL, f"{cfg.model_type}: packed segment 0 vs alone")
        assert_rel(lp[:, 5:], lb, REL, f"{cfg.model_type}: packed segment 1 vs alone")
    return True


def test_packed_segments_equal_separate_sequences():
    assert all(run_distributed(2, _segments_body, timeout=300))


def test_two_stage_split_equals_whole_model():
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    cfg = tiny_cfg(first_k_dense_replace=2)  # dense: single process, no MoE needed
    whole = DeepseekForCausalLM(cfg, init_seed=11)
    s0 = DeepseekForCausalLM(cfg, layer_ids=[0], post_process=False, init_seed=11)
    s1 = DeepseekForCausalLM(cfg, layer_ids=[1], pre_process=False, init_seed=11)
    assert s1.model.embed_tokens.weight.shared_embedding  # MTP on the last stage needs the embedding
    ids, labels, mask = data(cfg.vocab_size)

    def total(out):
        return (out["lm_loss"] * mask).sum() / mask.sum() + out["mtp_loss_scale"] * out["mtp_losses"][0].sum() / \
            out["mtp_loss_masks"][0].sum()

    lw = total(whole(ids, labels=labels, loss_mask=mask))
    lw.backward()
    h = s0(ids)
    h_in = h.detach().requires_grad_(True)
    s1.set_input_tensor(h_in)
    l1 = total(s1(ids, labels=labels, loss_mask=mask))
    l1.backward()
    h.backward(h_in.grad)
    assert_equal(l1, lw, "2-stage loss")  # the same ops in the same order, split at a detach
    gw = {n: p.grad for n, p in whole.named_parameters()}
    for stage in (s0, s1):
        for n, p in stage.named_parameters():
            if n == "model.embed_tokens.weight":
                continue
            assert_equal(p.grad, gw[n], f"2-stage grad of {n}")
    emb = s0.model.embed_tokens.weight.grad + s1.model.embed_tokens.weight.grad  # the embedding-group all-reduce
    # the whole model accumulates the main and the MTP use of each row itself; a row sums its tokens (B * S = 24
    # at most) from each of the two uses
    assert_close(emb, gw["model.embed_tokens.weight"], "embedding grad summed over the two stages", terms=2 * B * S)


@pytest.mark.parametrize("s", [128, 300, 1100])
def test_causal_block_attention_equals_full_softmax(s):
    """The causal math path (query blocks over the keys up to each block's end, scale and mask inside one
    baddbmm) equals softmax over the full masked s x s matrix, output and q/k/v grads, fp64; it keeps q, k and v
    themselves for backward (no copies), and keeps each block's probabilities instead of s x s."""
    from megatron_ascend.models.deepseek.attention import causal_query_blocks, core_attention
    blocks = causal_query_blocks(s)
    assert blocks[0][0] == 0 and blocks[-1][1] == s and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert (len(blocks) > 1) == (s > 128) and len(blocks) <= 9
    g = torch.Generator().manual_seed(s)
    b, n, dq, dv = 2, 3, 24, 16  # q/k head dim != v head dim: CPU SDPA has no kernel keeping q, k, v
    q, k, v = (torch.randn(s, b, n, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (dq, dq, dv))
    go = torch.randn(s, b, n * dv, generator=g, dtype=torch.float64)
    scale = dq ** -0.5
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = core_attention(q, k, v, None, scale)
    out.backward(go)
    ptrs = {p for p, _ in saved}
    assert all(t.untyped_storage().data_ptr() in ptrs for t in (q, k, v))
    qkv = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    probs = sum(nn for p, nn in set(saved) if p not in qkv)
    assert probs <= b * n * sum((e - a) * e for a, e in blocks) * 1.01 and (s <= 128 or probs < b * n * s * s)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    w = torch.einsum("sbnd,tbnd->bnst", qr, kr) * scale
    w = w.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    ref = torch.einsum("bnst,tbnd->sbnd", w, vr).reshape(s, b, n * dv)
    ref.backward(go)
    # fp64, blockwise vs one softmax: a row sums s keys (exp sums, probs x v); backward adds the dq / dk sums over s
    assert_close(out, ref, f"block attention s={s}", terms=2 * s)
    for name, a, r in (("q", q, qr), ("k", k, kr), ("v", v, vr)):
        assert_close(a.grad, r.grad, f"block attention d{name} s={s}", terms=4 * s)


def test_indexer_loss_gradient_follows_the_global_aux_loss_scale():
    """The DSA indexer's KL gradient is scaled like every other aux loss by the trainer's one scale
    (moe.set_aux_loss_scale = 1 / (micro-batches x dp)): the indexer weights get gradient only from that loss,
    so at scale 1/4 their grads are a quarter of those at scale 1."""
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.moe import set_aux_loss_scale
    cfg = tiny_cfg(model_type="deepseek_v32", first_k_dense_replace=2, index_n_heads=4, index_head_dim=16,
                   index_topk=3, dsa_indexer_loss_coeff=0.5, num_nextn_predict_layers=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    try:
        for scale in (1.0, 0.25):
            set_aux_loss_scale(scale)
            m = DeepseekForCausalLM(cfg, init_seed=3)
            out = m(ids, labels=ids, loss_mask=torch.ones(ids.shape))
            out["lm_loss"].mean().backward()
            grads[scale] = {n: p.grad.clone() for n, p in m.named_parameters() if ".indexer." in n}
    finally:
        set_aux_loss_scale(1.0)
    assert grads[1.0] and all(float(g.abs().sum()) > 0 for g in grads[1.0].values())
    for n, g in grads[1.0].items():
        # the scale multiplies the KL loss before backward: x 0.25 is exact in binary, so are the grads
        assert_equal(grads[0.25][n], 0.25 * g, f"{n} at aux-loss scale 1/4")
