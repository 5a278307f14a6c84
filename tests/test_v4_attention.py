"""DeepSeek-V4 attention (models/deepseek_v4/attention.py) against transformers' DeepseekV4Attention on the same
weights, module by module: output, input gradient and every parameter gradient, for sliding, CSA and HCA
layers, over sequences where the window, several compressed entries (incl. an incomplete last window) and the
indexer's top-k all matter -- single process and TP 2 with and without sequence parallel (one spawned world).
Also: the indexer's KL loss and its gradient against a reference built from transformers' pieces; selective and
full recompute replay bitwise (also at TP 2 + SP); init_weights is layout independent; saved activations of a
sliding layer grow linearly with the sequence; bad TP sizes are refused."""
import pytest
import torch

from megatron_ascend.config import ConfigError, ModelConfig, RopeScaling
from tests.harness import run_distributed
from tests.tolerance import assert_close, assert_equal

B, S = 2, 72           # 72 % 16 = 8: the HCA layer's last window is incomplete; 72 / 4 = 18 CSA entries
WINDOW, TOPK, HCA = 8, 5, 16
DENSE_TOPK = 12        # >= half the 18 CSA entries: core attention scores every entry under a mask (else gathers)
QBLOCK = 16            # query block of the core attention: 5 blocks, the last one partial
LAYERS = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
CASES = [(0, TOPK), (1, TOPK), (2, TOPK), (1, DENSE_TOPK)]  # (layer, index_topk)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}


def hf_config(topk=TOPK):
    import transformers
    return transformers.DeepseekV4Config(
        attn_implementation="eager", vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=WINDOW,
        index_n_heads=4, index_head_dim=16, index_topk=topk, layer_types=list(LAYERS),
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": HCA},
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, rope_scaling=dict(YARN),
        rope_theta=10000.0, compress_rope_theta=160000.0, max_position_embeddings=128, num_hash_layers=1)


def our_config(**kw):
    d = dict(model_type="deepseek_v4", vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
             head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=WINDOW,
             index_n_heads=4, index_head_dim=16, index_topk=TOPK, compress_ratios=(0, 4, HCA),
             compress_rope_theta=160000.0, rope_theta=10000.0, max_position_embeddings=128,
             rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32), n_routed_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=16, hc_mult=4, first_k_dense_replace=0, num_hash_layers=1)
    d.update(kw)
    return ModelConfig(**d)


def _randomise(module, seed):
    """Fan-in scaled weights, perturbed norms, non-zero sinks and position biases: every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or "position_bias" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def _attn_weights_hook(store):
    """Capture transformers' eager attention probabilities (its attention_interface returns them)."""
    import transformers.models.deepseek_v4.modeling_deepseek_v4 as mod
    orig = mod.eager_attention_forward

    def wrapped(*a, **k):
        o, w = orig(*a, **k)
        store.append(w)
        return o, w
    return mod, orig, wrapped


def reference(case, coeff=0.7, seed=0):
    """transformers' DeepseekV4Attention on random weights: output, input and parameter grads of <out, g>; for
    the CSA layer also the indexer KL loss (hand-written from the paper's recipe on transformers' attention
    probabilities, indexer scores and selection) and its gradient wrt the indexer weights."""
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4Attention,
                                                                      DeepseekV4RotaryEmbedding)
    layer_idx, topk = CASES[case]
    cfg = hf_config(topk)
    torch.manual_seed(seed)
    hf = DeepseekV4Attention(cfg, layer_idx).float()
    _randomise(hf, seed + 1 + layer_idx)
    gen = torch.Generator().manual_seed(seed + 10 + layer_idx)
    x = torch.randn(B, S, cfg.hidden_size, generator=gen).requires_grad_(True)
    g = torch.randn(B, S, cfg.hidden_size, generator=gen)
    pos = torch.arange(S)[None].expand(B, S)
    rot = DeepseekV4RotaryEmbedding(cfg)
    pe = {k: rot(x, pos, k) for k in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None,
                                             position_ids=pos)
    probs, scores = [], []
    mod, orig, wrapped = _attn_weights_hook(probs)
    hook = None
    if LAYERS[layer_idx] == "compressed_sparse_attention":
        hook = hf.compressor.indexer.scorer.register_forward_hook(lambda m, a, o: scores.append(o))
    mod.eager_attention_forward = wrapped
    try:
        out, _ = hf(x, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    finally:
        mod.eager_attention_forward = orig
        if hook is not None:
            hook.remove()
    (out * g).sum().backward()
    ref = dict(layer=layer_idx, topk=topk, sd={k: v.detach().clone() for k, v in hf.state_dict().items()},
               x=x.detach(), g=g,
               out=out.detach(), dx=x.grad.detach(),
               grads={n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None})
    if hook is not None:
        index = scores[0]                                     # [B, S, n] with grad to the indexer weights
        n = index.shape[-1]
        visible = torch.arange(n).view(1, 1, -1) < ((pos + 1) // 4).unsqueeze(-1)
        top = index.detach().masked_fill(~visible, float("-inf")).topk(min(topk, n), -1).indices
        selected = torch.zeros_like(visible).scatter_(-1, top, True) & visible
        p = probs[0].detach()[..., S:].sum(1)                 # attention mass on the entries, all heads
        rows = selected.any(-1)
        p = p[rows] / p[rows].sum(-1, keepdim=True)
        logq = index[rows].masked_fill(~selected[rows], float("-inf")).log_softmax(-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq.masked_fill(p <= 0, 0.0)), torch.zeros_like(p))
        kl = kl.sum(-1).mean()
        names = [n_ for n_, _ in hf.named_parameters() if ".indexer." in n_]
        params = [dict(hf.named_parameters())[n_] for n_ in names]
        igrads = torch.autograd.grad(coeff * kl, params)
        ref.update(kl=kl.item(), coeff=coeff, igrads=dict(zip(names, [t.detach() for t in igrads])),
                   selected=selected, visible=visible)
    return ref


@pytest.fixture(scope="module")
def refs():
    return [reference(i) for i in range(len(CASES))]


def _pack(refs_):
    import io
    buf = io.BytesIO()
    torch.save(refs_, buf)
    return buf.getvalue()


def _unpack(blob):
    import io
    return torch.load(io.BytesIO(blob), weights_only=True)


# ------------------------------------------------------------------------------------------------------------
# shared by the in-process and the spawned checks
# ------------------------------------------------------------------------------------------------------------
def build(cfg, layer_idx, sd, pg=None, par=None):
    from megatron_ascend.models.deepseek_v4.attention import DeepseekV4Attention
    from megatron_ascend.tensor_parallel.utils import shard_of
    m = DeepseekV4Attention(cfg, par, pg, layer_idx)
    m.query_block = QBLOCK
    own = dict(m.named_parameters())
    assert set(own) == set(sd), (sorted(set(own) ^ set(sd)))
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(shard_of(sd[n], p))
    return m


def run(m, ref, pg=None, sp=False):
    """Forward <out, g> + backward with ours (sequence-first); returns (out, dx) full [B, S, h] and the indexer
    loss (or None)."""
    from megatron_ascend.models.deepseek_v4.rope import V4Rope
    from megatron_ascend.tensor_parallel import mappings as M
    x = ref["x"].transpose(0, 1).contiguous()
    g = ref["g"].transpose(0, 1).contiguous()
    if sp:
        x, g = M._split_dim(x, 0, pg.tp), M._split_dim(g, 0, pg.tp)
    x.requires_grad_(True)
    pos = torch.arange(S)[None].expand(B, S)
    out, il = m(x, V4Rope(m.config)(pos), pos)
    (out * g).sum().backward()
    out, dx = out.detach(), x.grad
    if sp:
        out, dx = M._gather_dim(out, 0, pg.tp), M._gather_dim(dx, 0, pg.tp)
    return out.transpose(0, 1), dx.transpose(0, 1), il


def compare(m, ref, out, dx, pg, what):
    """Output, input gradient and every parameter gradient (gathered) against transformers'. ``terms``: an output
    element is a chain of sums over < S keys and a few hundred projection inputs; a gradient also sums over the
    B * S tokens."""
    from megatron_ascend.tensor_parallel import allreduce_sequence_parallel_grads, gather_full
    errs = {"out": assert_close(out, ref["out"], f"{what} output", terms=S * 4),
            "dx": assert_close(dx, ref["dx"], f"{what} input grad", terms=B * S * 4)}
    allreduce_sequence_parallel_grads(m.parameters(), pg)
    for n, p in m.named_parameters():
        full = gather_full(p.grad, p, pg) if (pg is not None and p.grad is not None) else p.grad
        if ".indexer." in n:  # top-k carries no gradient (transformers' indexer gets none either)
            assert full is None or full.abs().max() == 0, f"{what}: {n} got an LM gradient"
            assert n not in ref["grads"], n
            continue
        assert full is not None, f"{what}: {n} got no gradient"
        refg = ref["grads"][n]
        assert refg.abs().max() > 0, f"{what}: {n} has a zero reference gradient"
        errs[n] = assert_close(full, refg, f"{what} grad of {n}", terms=B * S * 4)
    return errs


# ------------------------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------------------------
def _what(ref):
    return f"{LAYERS[ref['layer']]} (index_topk {ref['topk']})"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_transformers_single_process(refs, case):
    ref = refs[case]
    m = build(our_config(index_topk=ref["topk"]), ref["layer"], ref["sd"])
    assert m.kind == LAYERS[ref["layer"]]
    out, dx, il = run(m, ref)
    assert il is None  # dsa_indexer_loss_coeff 0: no indexer loss, no indexer graph
    errs = compare(m, ref, out, dx, None, _what(ref))
    assert len(errs) >= 10


def test_the_window_entries_and_topk_all_matter(refs):
    """The parity cases are not degenerate: in transformers' own reference the CSA selection drops visible
    entries, and ours changes when the window, the entries or the selection change."""
    csa = refs[1]
    assert csa["visible"].sum(-1).max() == S // 4 and csa["selected"].sum(-1).max() == TOPK
    assert (csa["selected"] != csa["visible"]).any()
    half = dict(refs[2]["sd"])
    half["compressor.position_bias"] = half["compressor.position_bias"][: HCA // 2]
    for idx, change, sd in [(0, dict(sliding_window=WINDOW + 1), refs[0]["sd"]),
                            (1, dict(index_topk=TOPK + 3), refs[1]["sd"]),
                            (2, dict(compress_ratios=(0, 4, HCA // 2)), half),
                            (2, dict(compress_rope_theta=10000.0), refs[2]["sd"])]:
        m = build(our_config(**change), idx, sd)
        out, _, _ = run(m, refs[idx])
        assert (out - refs[idx]["out"]).abs().max() > 1e-3, f"layer {idx} is insensitive to {change}"


@pytest.mark.parametrize("case", [1, 3])
def test_indexer_loss_matches_reference(refs, case):
    ref = refs[case]
    m = build(our_config(dsa_indexer_loss_coeff=ref["coeff"], index_topk=ref["topk"]), 1, ref["sd"])
    from megatron_ascend.models.deepseek_v4.rope import V4Rope
    x = ref["x"].transpose(0, 1).contiguous().requires_grad_(True)
    pos = torch.arange(S)[None].expand(B, S)
    out, il = m(x, V4Rope(m.config)(pos), pos)
    assert_close(il.detach(), torch.tensor(ref["kl"]), "indexer KL", terms=B * S * S // 4)
    (ref["coeff"] * il).backward()
    assert x.grad is None  # the indexer reads detached inputs
    for n, p in m.named_parameters():
        if ".indexer." in n:
            assert_close(p.grad, ref["igrads"][n], f"indexer KL grad of {n}", terms=B * S * S // 4)
        else:
            assert p.grad is None, f"{n} got a gradient from the indexer loss"
    with torch.no_grad():
        assert m(x, V4Rope(m.config)(pos), pos)[1] is None  # no loss without grad


RECOMPUTE = [("core_attn",), ("mla_up_proj",), ("core_attn", "mla_up_proj")]


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def recompute_runs(m, ref, pg=None, sp=False):
    """Output, input grad, indexer loss and parameter grads of <out, g> + indexer loss with no recompute, each
    selective setting and full recompute (tensor_parallel.checkpoint of the whole module, as a layer's full
    recompute runs it); every run must equal the first bitwise."""
    from megatron_ascend.models.deepseek_v4.rope import V4Rope
    from megatron_ascend.tensor_parallel import mappings as M
    from megatron_ascend.tensor_parallel.random import checkpoint

    def step(mods, full=False):
        m.recompute_modules = frozenset(mods)
        m.zero_grad(set_to_none=True)
        x, g = ref["x"].transpose(0, 1).contiguous(), ref["g"].transpose(0, 1).contiguous()
        if sp:
            x, g = M._split_dim(x, 0, pg.tp), M._split_dim(g, 0, pg.tp)
        x.requires_grad_(True)
        pos = torch.arange(S)[None].expand(B, S)
        rope = V4Rope(m.config)(pos)
        out, il = checkpoint(m, x, rope, pos) if full else m(x, rope, pos)
        ((out * g).sum() + (il if il is not None else 0.0)).backward()
        m.recompute_modules = frozenset()
        return out.detach(), x.grad, il, _grads(m)

    base = step(())
    runs = {mods: step(mods) for mods in RECOMPUTE}
    runs["full"] = step((), full=True)
    for k, (out, dx, il, grads) in runs.items():
        assert_equal(out, base[0], f"{k} output")
        assert_equal(dx, base[1], f"{k} input grad")
        assert (il is None) == (base[2] is None)
        if il is not None:
            assert_equal(il.detach(), base[2].detach(), f"{k} indexer loss")
        assert grads.keys() == base[3].keys()
        for n in grads:
            assert_equal(grads[n], base[3][n], f"{k} grad of {n}")
    return len(runs)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_recompute_replays_bitwise(refs, case):
    """Selective (core_attn, mla_up_proj, both) and full recompute give bitwise the output, input grad,
    parameter grads and indexer loss of no recompute."""
    ref = refs[case]
    m = build(our_config(dsa_indexer_loss_coeff=0.3, index_topk=ref["topk"]), ref["layer"], ref["sd"])
    assert recompute_runs(m, ref) == len(RECOMPUTE) + 1


def _saved_bytes(cfg, layer_idx, s, modules=()):
    from megatron_ascend.models.deepseek_v4.attention import DeepseekV4Attention
    from megatron_ascend.models.deepseek_v4.rope import V4Rope
    from megatron_ascend.recompute import SavedTensorMeter
    m = DeepseekV4Attention(cfg, None, None, layer_idx)
    m.recompute_modules = frozenset(modules)
    _randomise(m, 3)
    x = torch.randn(s, 1, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(s)[None]
    rope = V4Rope(cfg)(pos)
    meter = SavedTensorMeter(m)
    with meter:
        out, _ = m(x, rope, pos)
    out.sum().backward()
    return meter.total_bytes


def test_sliding_layer_activation_memory_is_linear_in_sequence():
    """Bytes saved for backward per token by a sliding layer (window 32, default query block 128) at s = 256 and
    512 are equal up to the first block's shorter key range (one [s, s] fp32 score tensor per head would add
    heads * s * 4 bytes per token: +4 KiB at 256, +8 KiB at 512); what mla_up_proj saves is >= q and q_b_proj's
    output ([H, D] per token each)."""
    cfg = our_config(sliding_window=32, compress_ratios=(0, 0, 0), max_position_embeddings=4096)
    per1, per2 = _saved_bytes(cfg, 0, 256) / 256, _saved_bytes(cfg, 0, 512) / 512
    assert per2 <= 1.05 * per1, f"per-token saved bytes grow: {per1:.0f} at s=256, {per2:.0f} at s=512"
    q_bytes = cfg.num_attention_heads * cfg.head_dim * 4
    up = _saved_bytes(cfg, 0, 256, ("mla_up_proj",)) / 256
    assert per1 - up >= 2 * q_bytes, (per1, up, q_bytes)


def test_bad_tp_sizes_are_refused():
    from megatron_ascend.models.deepseek_v4.attention import check_config
    cfg = our_config(num_attention_heads=6, o_groups=3, index_n_heads=4)
    with pytest.raises(ConfigError, match="num_attention_heads 6 is not divisible"):
        check_config(cfg, 4)
    with pytest.raises(ConfigError, match="o_groups 3 is not divisible"):
        check_config(cfg, 6)  # tp 6 divides the heads but not the groups
    with pytest.raises(ConfigError, match="index_n_heads 4 is not divisible"):
        check_config(our_config(num_attention_heads=6, o_groups=6), 3)
    with pytest.raises(ConfigError, match="o_groups 3 does not divide"):
        check_config(our_config(o_groups=3), 1)
    check_config(our_config(), 2)
    # and before any model is built, from the configs a user passes
    from megatron_ascend.config import ParallelConfig, validate_all
    with pytest.raises(ConfigError, match="o_groups 2 is not divisible by tensor-model-parallel-size 4"):
        validate_all(our_config(), ParallelConfig(world_size=4, tensor_model_parallel_size=4))
    with pytest.raises(ConfigError, match="num-attention-heads 4 is not divisible"):
        validate_all(our_config(), ParallelConfig(world_size=8, tensor_model_parallel_size=8))
    validate_all(our_config(), ParallelConfig(world_size=2, tensor_model_parallel_size=2))


# ------------------------------------------------------------------------------------------------------------
# TP 2, sequence parallel off / on (one spawned world)
# ------------------------------------------------------------------------------------------------------------
def _tp_body(blob):
    import torch.distributed as dist
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    refs_ = _unpack(blob)
    n = dist.get_world_size()
    done = []
    for sp in (False, True):
        par = ParallelConfig(world_size=n, tensor_model_parallel_size=n, sequence_parallel=sp)
        pg = initialize_model_parallel(par)
        for ref in refs_:
            what = f"{_what(ref)} tp={n} sp={sp}"
            m = build(our_config(index_topk=ref["topk"]), ref["layer"], ref["sd"], pg, par)
            out, dx, _ = run(m, ref, pg, sp)
            done.append((what, len(compare(m, ref, out, dx, pg, what))))
        # the indexer loss and its gradient at this layout
        ref = refs_[1]
        m = build(our_config(dsa_indexer_loss_coeff=ref["coeff"]), 1, ref["sd"], pg, par)
        _, _, il = run(m, dict(ref, g=torch.zeros_like(ref["g"])), pg, sp)
        assert_close(il.detach(), torch.tensor(ref["kl"]), f"indexer KL sp={sp}", terms=B * S * S // 4)
        m.zero_grad(set_to_none=True)
        _, _, il = run(m, dict(ref, g=torch.zeros_like(ref["g"])), pg, sp)
        m.zero_grad(set_to_none=True)
        (ref["coeff"] * il).backward()
        from megatron_ascend.tensor_parallel import gather_full
        for name, p in m.named_parameters():
            if ".indexer." in name:
                assert_close(gather_full(p.grad, p, pg), ref["igrads"][name], f"indexer grad {name} sp={sp}",
                             terms=B * S * S // 4)
        done.append((f"indexer loss sp={sp}", 1))
        m = build(our_config(dsa_indexer_loss_coeff=0.3), 1, ref["sd"], pg, par)
        done.append((f"recompute CSA sp={sp}", recompute_runs(m, ref, pg, sp)))
    # init_weights draws by global name: the TP2 shards gathered equal the single-process init bitwise
    from megatron_ascend.models.deepseek_v4.attention import DeepseekV4Attention
    from megatron_ascend.tensor_parallel import gather_full
    for i in range(len(LAYERS)):
        one, two = DeepseekV4Attention(our_config(), None, None, i), DeepseekV4Attention(our_config(), par, pg, i)
        for m in (one, two):
            m.init_weights(f"model.layers.{i}.self_attn.", 0.02, 1234)
        p2 = dict(two.named_parameters())
        for name, p in one.named_parameters():
            assert_equal(gather_full(p2[name].data, p2[name], pg), p.data, f"init of {name}")
            if name.endswith(("sinks", "position_bias")):
                assert p.abs().max() == 0, name
            elif name.endswith("norm.weight"):
                assert (p == 1).all(), name
            else:
                assert 0.01 < p.std() < 0.03, name
        done.append((f"init {LAYERS[i]}", 1))
    return done


def test_matches_transformers_tp2_with_and_without_sp(refs):
    done = run_distributed(2, _tp_body, _pack(refs), timeout=300)[0]
    assert len(done) == 2 * (len(CASES) + 2) + len(LAYERS), done
    assert all(k >= 1 for _, k in done), done
