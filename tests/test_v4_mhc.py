"""mHC (models/deepseek_v4/hyper_connection.py): the stream-mixing matrix is doubly stochastic after the
configured Sinkhorn iterations (and not after one: the iterations matter); our [s, b, n*h] streams, mixing
coefficients and head collapse equal transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead and the
decoder layer's residual update on the same weights (fp32); bf16 streams keep fp32 coefficients."""
import pytest
import torch

from megatron_ascend.models.deepseek_v4.hyper_connection import (HyperConnection, HyperHead, collapse, expand,
                                                                 hc_post, sinkhorn)
from tests.tolerance import assert_close

N, H, B, S = 4, 16, 2, 5
EPS32 = torch.finfo(torch.float32).eps


def _hc(seed=0, std=0.3):
    torch.manual_seed(seed)
    hc = HyperConnection(H, N, 20, 1e-6, 1e-6)
    with torch.no_grad():
        hc.fn.normal_(0, std)
        hc.base.normal_(0, 0.5)
        hc.scale.copy_(1 + 0.2 * torch.randn(3))
    return hc


@pytest.mark.parametrize("std", [0.02, 0.06])
def test_comb_doubly_stochastic_after_configured_iterations(std):
    """fn std 0.02 / 0.06 on 4 x 16 stream values give mixing logits of std ~0.2 / ~0.5."""
    hc = _hc(std=std)
    streams = torch.randn(S, B, N * H) * 3
    comb = hc.coefficients(streams)[2]
    assert comb.dtype == torch.float32 and comb.shape == (S, B, N, N) and (comb > 0).all()
    # Sinkhorn divides by (sum + hc_eps), so each sum settles at 1 / (1 + hc_eps): within hc_eps of 1, plus the
    # rounding of an n-term fp32 sum
    bound = hc.hc_eps + 4 * N * EPS32
    for dim, what in ((-1, "rows"), (-2, "columns")):
        err = (comb.sum(dim) - 1).abs().max().item()
        assert err <= bound, f"{what} of comb sum to 1 within {err:.2e} > {bound:.2e} (fn std {std})"


def test_sinkhorn_rows_converge_slowly_for_large_mixing_logits():
    """The reference's own limit (docs/V4.md): with mixing logits of std ~2.5 (V4-Flash's width at transformers'
    init) 20 iterations leave some rows off by more than 1e-6; columns are always normalised last. We reproduce the
    reference's iterations exactly rather than iterate to convergence."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, N, N, generator=g, dtype=torch.float64) * 2.5
    errs = {}
    for it in (5, 20, 100):
        c = sinkhorn(torch.softmax(logits, -1) + 1e-6, it, 1e-6)
        assert (c.sum(-2) - 1).abs().max().item() <= 1e-5  # hc_eps / (column sum before the last division)
        errs[it] = (c.sum(-1) - 1).abs().max().item()
    assert errs[100] < errs[20] < errs[5] and errs[20] > 1e-6


def test_one_sinkhorn_iteration_is_not_enough():
    """The check above can fail: a softmax normalised once by columns is not row-stochastic."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, N, N, generator=g) * 0.5
    one = sinkhorn(torch.softmax(logits, -1) + 1e-6, 1, 1e-6)
    assert (one.sum(-1) - 1).abs().max().item() > 1e-3
    twenty = sinkhorn(torch.softmax(logits, -1) + 1e-6, 20, 1e-6)
    assert (twenty.sum(-1) - 1).abs().max().item() <= 1e-6 + 4 * N * EPS32


def _hf_pieces(hc_mult=N, hidden=H):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4HyperConnection,
                                                                      DeepseekV4HyperHead)
    cfg = DeepseekV4Config(hidden_size=hidden, hc_mult=hc_mult, num_hidden_layers=1, num_attention_heads=1,
                           head_dim=16, q_lora_rank=8, o_groups=1, o_lora_rank=8)
    return DeepseekV4HyperConnection(cfg), DeepseekV4HyperHead(cfg)


def test_streams_equal_transformers_residual_update():
    hf_hc, hf_head = _hf_pieces()
    ours = _hc(seed=1)
    head = HyperHead(H, N, 1e-6, 1e-6)
    with torch.no_grad():
        hf_hc.fn.copy_(ours.fn)
        hf_hc.base.copy_(ours.base)
        hf_hc.scale.copy_(ours.scale)
        head.hc_fn.normal_(0, 0.3)
        head.hc_base.normal_(0, 0.5)
        head.hc_scale.fill_(1.3)
        hf_head.hc_fn.copy_(head.hc_fn)
        hf_head.hc_base.copy_(head.hc_base)
        hf_head.hc_scale.copy_(head.hc_scale)
    ref_streams = torch.randn(B, S, N, H)            # transformers' layout [B, S, N, D]
    sublayer_out = torch.randn(B, S, H)
    streams = ref_streams.transpose(0, 1).flatten(-2)  # ours [S, B, N*H]
    post_r, comb_r, y_r = hf_hc(ref_streams)
    new_r = post_r.unsqueeze(-1) * sublayer_out.unsqueeze(-2) + torch.matmul(comb_r.transpose(-1, -2), ref_streams)
    post, comb, y = ours(streams)
    new = hc_post(sublayer_out.transpose(0, 1), streams, post, comb)
    assert_close(post, post_r.transpose(0, 1), "post", terms=4 * N * H)
    assert_close(comb, comb_r.transpose(0, 1), "comb", terms=4 * N * H)
    assert_close(y, y_r.transpose(0, 1), "collapsed sublayer input", terms=N)
    assert_close(new, new_r.transpose(0, 1).flatten(-2), "new streams", terms=N + 1)
    assert_close(head(streams), hf_head(ref_streams).transpose(0, 1), "hc_head", terms=4 * N * H)
    # the embedding enters as n equal streams (transformers' expand)
    e = torch.randn(S, B, H)
    assert torch.equal(expand(e, N).unflatten(-1, (N, H)), e.unsqueeze(-2).expand(S, B, N, H))
    assert torch.equal(collapse(expand(e, N), torch.full((S, B, N), 0.25)), e)


def test_bf16_streams_keep_fp32_coefficients():
    hc = _hc()
    streams = torch.randn(S, B, N * H).bfloat16()
    post, comb, y = hc(streams)
    assert post.dtype == comb.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert hc_post(y, streams, post, comb).dtype == torch.bfloat16
    assert all(getattr(p, "keep_fp32", False) for p in hc.parameters())
