"""The Ascend rows of the kernel table (platform/kernels_npu.py) against a fake torch_npu / mindspeed
(tests/fake_torch_npu.py: documented signatures and argument checks, documented outputs computed on CPU).

* each binding: the arguments it passes (layouts BSND / TND, masks and sparse modes, scale, keep_prob, group
  lists, int32 indices) and its values and gradients against the reference (fp32: sum-order bound; bf16: bf16
  rounding);
* declines (V4's clamp, YaRN tables above 1, float64, sqrt-softplus routing) fall back to the reference with the
  reason kept; TorchNPU versions without an operator (6.0 grouped matmul without group_type, 7.1 permute without
  autograd) bind MindSpeed's or nothing;
* switches: --reference-kernels / --no-fused-kernels and the one start-up line;
* a 2-rank training run (EP 2, MTP, noaux_tc) with every entry through the fake equals the reference run, and
  every operator was called; a packed-sequence forward takes the TND varlen path.
"""
import pytest
import torch

from megatron_ascend.config import ConfigError
from megatron_ascend.platform import kernels
from tests import fake_torch_npu
from tests.harness import run_distributed
from tests.tolerance import assert_close


@pytest.fixture
def npu():
    yield from _npu("7.2", False)


@pytest.fixture
def npu_ms():
    yield from _npu("7.2", True)


def _npu(version, mindspeed):
    import megatron_ascend.models.deepseek.attention  # noqa: F401  (registers the attention / rope references)
    import megatron_ascend.moe.router  # noqa: F401
    with fake_torch_npu.install(version, mindspeed=mindspeed) as mod:
        kernels.configure(kind="npu")
        kernels.reset_usage()
        try:
            yield mod
        finally:
            kernels.unregister("torch_npu.")
            kernels.unregister("mindspeed.")
            kernels.reset()


def _last(mod, name):
    return [c for n, c in mod.calls if n == name][-1]


def _grads(fn, *inputs):
    ins = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*ins)
    torch.manual_seed(7)
    g = torch.randn(out.shape, dtype=out.dtype)  # not randn_like: it copies a non-contiguous output's strides
    out.backward(g)
    return out.detach(), [x.grad for x in ins if x.grad is not None]


def _same(fused, ref, *inputs, terms, dtype=None, what=""):
    o1, g1 = _grads(fused, *inputs)
    o2, g2 = _grads(ref, *inputs)
    assert_close(o1, o2, f"{what} output", terms=terms, dtype=dtype)
    assert len(g1) == len(g2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(a, b, f"{what} grad {i}", terms=terms, dtype=dtype)


def test_rms_norm_swiglu_rope(npu):
    assert kernels.table()["rms_norm"] == "torch_npu.npu_rms_norm"
    torch.manual_seed(0)
    x, w = torch.randn(6, 2, 32), torch.rand(32) + 0.5
    _same(lambda a, b: kernels.get("rms_norm")(a, b, 1e-6), lambda a, b: kernels.reference_of("rms_norm")(a, b, 1e-6),
          x, w, terms=32, what="rms_norm")
    assert _last(npu, "npu_rms_norm")["epsilon"] == 1e-6
    xb, wb = x.bfloat16(), w.bfloat16()
    _same(lambda a, b: kernels.get("rms_norm")(a, b, 1e-6), lambda a, b: kernels.reference_of("rms_norm")(a, b, 1e-6),
          xb, wb, terms=4, dtype=torch.bfloat16, what="rms_norm bf16")

    g, u = torch.randn(5, 16), torch.randn(5, 16)
    _same(lambda a, b: kernels.get("swiglu")(a, b), lambda a, b: kernels.reference_of("swiglu")(a, b), g, u,
          terms=1, what="swiglu")
    assert _last(npu, "npu_swiglu")["self"] == ((5, 32), torch.float32)  # [gate | up]: the gate first
    kernels.get("swiglu")(g, u, 7.0)  # V4's clamp: not in npu_swiglu
    assert "clamp" in kernels.declined()["swiglu"]

    from megatron_ascend.models.deepseek.rope import RotaryTables, apply_rope_interleaved_reference
    from tests.test_model_deepseek import tiny_cfg
    cfg = tiny_cfg()
    cos, sin = RotaryTables(cfg)(torch.arange(6).view(1, 6).expand(2, 6))
    xr = torch.randn(6, 2, 3, cos.shape[-1] * 2)
    _same(lambda a: kernels.get("rope_interleaved")(a, cos, sin),
          lambda a: apply_rope_interleaved_reference(a, cos, sin), xr, terms=2, what="rope")
    call = _last(npu, "npu_rotary_mul")
    assert call["r1"] == ((6, 2, 1, cos.shape[-1] * 2), torch.float32)  # SBND x with SB1D tables, half mode
    out = kernels.get("rope_interleaved")(xr, cos * 1.2, sin * 1.2, 1.2)  # YaRN-scaled tables: declined
    assert "YaRN" in kernels.declined()["rope_interleaved"]
    assert_close(out, apply_rope_interleaved_reference(xr, cos * 1.2, sin * 1.2), "scaled rope", terms=2)


def _qkv(s=10, b=2, n=3, dq=12, dv=8, dtype=torch.float32):
    torch.manual_seed(1)
    return (torch.randn(s, b, n, dq, dtype=dtype), torch.randn(s, b, n, dq, dtype=dtype),
            torch.randn(s, b, n, dv, dtype=dtype))


def test_attention_layouts(npu):
    from megatron_ascend.models.deepseek.attention import math_attention
    q, k, v = _qkv()
    scale = 12 ** -0.5
    fa = kernels.get("attention")
    # causal: BSND, the compressed mask, sparse_mode 2, the softmax scale passed explicitly
    _same(lambda a, b, c: fa(a, b, c, None, scale), lambda a, b, c: math_attention(a, b, c, None, scale), q, k, v,
          terms=10 * 12, what="causal")
    call = _last(npu, "npu_fusion_attention")
    assert (call["input_layout"], call["sparse_mode"], call["scale"], call["keep_prob"], call["head_num"]) == \
        ("BSND", 2, scale, 1.0, 3)
    assert call["atten_mask"] == ((2048, 2048), torch.bool) and call["query"] == ((2, 10, 3, 12), torch.float32)
    # packed sequences: TND varlen with the cumulative segment ends of the flattened (b s) tokens
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    mask = kernels.packed_mask(seg)
    _same(lambda a, b, c: fa(a, b, c, mask, scale), lambda a, b, c: math_attention(a, b, c, mask, scale), q, k, v,
          terms=10 * 12, what="packed")
    call = _last(npu, "npu_fusion_attention")
    assert (call["input_layout"], call["sparse_mode"]) == ("TND", 3)
    assert call["actual_seq_qlen"] == call["actual_seq_kvlen"] == [3, 7, 10, 16, 20]
    # any other bool mask (DSA top-k): BSND with the complement (True = masked), sparse_mode 0
    torch.manual_seed(2)
    dense = (torch.rand(2, 1, 10, 10) < 0.5) | torch.eye(10, dtype=torch.bool)
    dense &= torch.ones(10, 10, dtype=torch.bool).tril()
    _same(lambda a, b, c: fa(a, b, c, dense, scale), lambda a, b, c: math_attention(a, b, c, dense, scale), q, k, v,
          terms=10 * 12, what="dense mask")
    call = _last(npu, "npu_fusion_attention")
    assert (call["input_layout"], call["sparse_mode"], call["atten_mask"]) == ("BSND", 0, ((2, 1, 10, 10), torch.bool))
    # bf16, MLA head dims (qk 192 / v 128 take no padding in BSND)
    qb, kb, vb = _qkv(s=6, b=1, n=2, dq=192, dv=128, dtype=torch.bfloat16)
    _same(lambda a, b, c: fa(a, b, c, None, 0.07), lambda a, b, c: math_attention(a, b, c, None, 0.07), qb, kb, vb,
          terms=4, dtype=torch.bfloat16, what="bf16 MLA")
    q64 = [t.double() for t in (q, k, v)]
    fa(*q64, None, scale)
    assert "fp16 / bf16 / fp32" in kernels.declined()["attention"]


def test_grouped_matmul_and_permute(npu):
    assert kernels.table()["grouped_matmul"] == "torch_npu.npu_grouped_matmul"
    assert kernels.table()["moe_permute"] == "torch_npu.npu_moe_token_permute"
    torch.manual_seed(3)
    counts = [3, 0, 5, 1]
    x, w = torch.randn(9, 16), torch.randn(4, 8, 16)
    gm = kernels.get("grouped_matmul")
    _same(lambda a, b: gm(a, b, counts), lambda a, b: kernels.reference_of("grouped_matmul")(a, b, counts), x, w,
          terms=16, what="grouped matmul")
    calls = [c for n, c in npu.calls if n == "npu_grouped_matmul"]
    assert [(c["split_item"], c["group_type"], c["group_list_type"]) for c in calls[-3:]] == \
        [(2, 0, 1), (2, 0, 1), (3, 2, 1)]  # forward, dX, dW (K-grouped)
    assert calls[-3]["group_list"] == ((4,), torch.int64)
    gm(x.double(), w.double(), counts)
    assert "float64" in kernels.declined()["grouped_matmul"]

    idx = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1], [3, 3]])
    probs = torch.rand(5, 2)
    xs = torch.randn(5, 6)

    def through(perm):
        def f(a, p):
            rows, un = perm(a, idx)
            return un(rows * 2.0 + 1.0, p)
        return f
    _same(through(kernels.get("moe_permute")), through(kernels.reference_of("moe_permute")), xs, probs, terms=2,
          what="permute")
    assert _last(npu, "npu_moe_token_permute")["indices"] == ((5, 2), torch.int32)
    rows, _ = kernels.get("moe_permute")(xs, idx)
    ref_rows, _ = kernels.reference_of("moe_permute")(xs, idx)
    assert torch.equal(rows, ref_rows)  # the same stable expert-major order


def test_mindspeed_and_versions():
    import megatron_ascend.moe.experts  # noqa: F401
    for version, ms, want in [("7.2", True, ("mindspeed.ops.gmm.npu_gmm", "torch_npu.npu_moe_token_permute")),
                              ("7.1", True, ("mindspeed.ops.gmm.npu_gmm", "mindspeed.ops.npu_moe_token_permute")),
                              ("7.1", False, ("torch_npu.npu_grouped_matmul", "reference")),
                              ("6.0", False, ("torch._grouped_mm", "reference"))]:
        gen = _npu(version, ms)
        mod = next(gen)
        try:
            t = kernels.table()
            assert (t["grouped_matmul"], t["moe_permute"]) == want, (version, ms, t)
            if ms:
                torch.manual_seed(4)
                counts = [2, 3]
                x, w = torch.randn(5, 16), torch.randn(2, 8, 16)
                _same(lambda a, b: kernels.get("grouped_matmul")(a, b, counts),
                      lambda a, b: kernels.reference_of("grouped_matmul")(a, b, counts), x, w, terms=16, what="gmm")
                assert _last(mod, "mindspeed.npu_gmm")["group_list"] == ((2,), torch.int64)
        finally:
            next(gen, None)


def test_router_topk(npu):
    from megatron_ascend.moe.router import score
    torch.manual_seed(5)
    logits = torch.randn(64, 16)
    bias = torch.randn(16) * 0.1
    top = kernels.get("router_topk")
    ref = kernels.reference_of("router_topk")
    for method, scoring, groups, kg, b in [("noaux_tc", "sigmoid", 4, 2, bias), ("group_limited_greedy", "softmax", 4,
                                                                                  2, None), ("greedy", "softmax", 1, 1, None)]:
        s = score(logits, scoring)
        got = top(logits, s, 3, method, groups, kg, b, scoring)
        want = ref(logits, s, 3, method, groups, kg, b, scoring)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), method
        call = _last(npu, "npu_moe_gating_top_k")
        assert (call["group_select_mode"], call["norm_type"], call["group_count"], call["k_group"]) == \
            (1 if method == "noaux_tc" else 0, 1 if scoring == "sigmoid" else 0, groups, kg)
    s = score(logits, "sqrtsoftplus")
    top(logits, s, 3, "noaux_tc", 1, 1, None, "sqrtsoftplus")
    assert "sqrtsoftplus" in kernels.declined()["router_topk"]


def test_switches_and_startup_line(npu):
    line = kernels.startup_line()
    assert line.startswith("kernels (npu): ") and "attention=torch_npu.npu_fusion_attention" in line
    for entry in kernels.ENTRIES:
        if entry != "sliding_attention":  # needs TorchNPU >= 7.3 (test_v4_sliding_window_with_sinks)
            assert f"{entry}=torch_npu." in line or f"{entry}=mindspeed." in line, (entry, line)
    kernels.configure(off=["attention", "swiglu"])
    line = kernels.startup_line()
    assert "attention=reference (--reference-kernels)" in line and "rms_norm=torch_npu.npu_rms_norm" in line
    kernels.configure(all_off=True)
    assert set(kernels.table().values()) == {"reference"}
    with pytest.raises(ConfigError, match="--reference-kernels flash"):
        kernels.configure(off=["flash"])


TINY = ("--num-layers 3 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 8 "
        "--moe-ffn-hidden-size 16 --n-shared-experts 1 --moe-router-topk 2 --first-k-dense-replace 1 "
        "--moe-router-score-function sigmoid --moe-router-topk-method noaux_tc --moe-router-num-groups 2 "
        "--moe-router-group-topk 1 --moe-aux-loss-coeff 1e-3 --mtp-num-layers 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 8 --lr 3e-3 --train-iters 1 --eval-interval 100 --log-interval 100 --mock-data "
        "--expert-model-parallel-size 2 --seed 5")


def _train_body():
    """One iteration with every entry through the fake torch_npu, then the same with --no-fused-kernels."""
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    import megatron_ascend.models.deepseek.attention  # noqa: F401
    out = []
    with fake_torch_npu.install("7.2") as mod:
        kernels.configure(kind="npu")
        for extra in ([], ["--no-fused-kernels"]):
            del mod.calls[:]
            kernels.reset_usage()
            tr = Trainer(parse(TINY.split() + extra, "pretrain"), print_fn=lambda s: None)
            res = tr.train()
            tr.close()
            out.append((res.losses, res.grad_norms, sorted(set(mod.rec.names())), kernels.usage(),
                        kernels.declined()))
    return out


def test_training_step_through_fake_npu_equals_reference():
    for (lf, gf, names, usage, declined), (lr, gr, names_ref, _, _) in run_distributed(2, _train_body, timeout=300):
        for key in ("lm loss", "mtp_1 loss"):
            assert_close(torch.tensor(lf[1][key]), torch.tensor(lr[1][key]), key, terms=64)
        assert_close(torch.tensor(gf[1]), torch.tensor(gr[1]), "grad norm", terms=64)
        for op in ("npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention", "npu_swiglu", "npu_grouped_matmul",
                   "npu_moe_token_permute", "npu_moe_token_unpermute", "npu_moe_gating_top_k"):
            assert op in names, (op, names)
        assert not [n for n in names_ref if n.startswith("npu_")]  # --no-fused-kernels: nothing reached torch_npu
        assert declined == {}, declined
        assert all(impl != "reference" for u in usage.values() for impl in u), usage


def test_packed_forward_takes_tnd(npu):
    from megatron_ascend.models.deepseek.model import DeepseekForCausalLM
    from tests.test_model_deepseek import tiny_cfg
    cfg = tiny_cfg()
    torch.manual_seed(6)
    model = DeepseekForCausalLM(cfg, init_seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    pos = torch.cat([torch.arange(5), torch.arange(7)]).view(1, 12).expand(2, 12).clone()
    pos[1] = torch.arange(12)
    labels = torch.roll(ids, -1, 1)
    out = model(ids, position_ids=pos, labels=labels, segment_ids=seg)["lm_loss"]
    kernels.configure(all_off=True)
    ref = model(ids, position_ids=pos, labels=labels, segment_ids=seg)["lm_loss"]
    assert_close(out, ref, "packed lm loss", terms=64 * 32)
    tnd = [c for n, c in npu.calls if n == "npu_fusion_attention" and c["input_layout"] == "TND"]
    assert tnd and tnd[0]["actual_seq_qlen"] == [5, 12, 24]


def test_v4_sliding_window_with_sinks():
    from megatron_ascend.models.deepseek_v4.core_attention import sink_window_attention, sliding_attention
    gen = _npu("7.3", False)
    mod = next(gen)
    try:
        assert kernels.table()["sliding_attention"] == "torch_npu.npu_fusion_attention(sink)"
        torch.manual_seed(8)
        q, kv, sinks = torch.randn(2, 12, 4, 16), torch.randn(2, 12, 16), torch.randn(4)
        _same(lambda a, b, c: sink_window_attention(a, b, None, None, c, 0.25, 5)[0],
              lambda a, b, c: sliding_attention(a, b, c, 0.25, 5), q, kv, sinks, terms=16 * 6, what="v4 sliding")
        call = _last(mod, "npu_fusion_attention")
        assert (call["sparse_mode"], call["pre_tockens"], call["next_tockens"], call["key"], call["sink"]) == \
            (4, 4, 0, ((2, 12, 1, 16), torch.float32), ((4,), torch.float32))
    finally:
        next(gen, None)
    gen = _npu("7.2", False)  # no sink argument before 7.3: the reference
    next(gen)
    try:
        assert kernels.table()["sliding_attention"] == "reference"
    finally:
        next(gen, None)
