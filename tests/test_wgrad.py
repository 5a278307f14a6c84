"""Gradient-accumulation fusion (tensor_parallel/wgrad.py + the DDP wrapper): weight-gradient GEMMs write into
main_grad, the buffer is zeroed lazily. Units for the fused linear / grouped weight gradient (overwrite when
stale, accumulate after, zero the groups without rows), and the whole DeepSeek model through DDP with fusion
on equal to fusion off (bitwise but for a few
weights whose contributions are summed in another order), with the lazily zeroed buffer poisoned with NaN between steps (any stale
read would show), single process and at TP2 x EP2 x DP2 with overlapped bucketed reductions."""
from __future__ import annotations

import pytest
import torch

from megatron_ascend.tensor_parallel import wgrad
from tests.harness import run_distributed
from tests.tolerance import assert_close


def _fake_ddp_param(p):
    p.fuse_wgrad = True
    p.main_grad = torch.full_like(p, float("nan"))
    p.main_grad_stale = True
    p.grad_added_to_main_grad = False
    return p


def test_fused_linear_overwrites_when_stale_then_accumulates():
    torch.manual_seed(0)
    lin = wgrad.Linear(6, 5, bias=True)
    ref = torch.nn.Linear(6, 5, bias=True)
    ref.load_state_dict(lin.state_dict())
    _fake_ddp_param(lin.weight)
    xs = [torch.randn(3, 2, 6, requires_grad=True) for _ in range(2)]
    for x in xs:
        lin(x).square().sum().backward()
        assert lin.weight.grad_added_to_main_grad and lin.weight.grad is not None  # the placeholder
        lin.weight.grad, lin.weight.grad_added_to_main_grad = None, False
    xr = [x.detach().clone().requires_grad_() for x in xs]
    for x in xr:
        ref(x).square().sum().backward()
    # weight / bias grads: 2 micro-batches x 6 tokens summed (addmm_ into main_grad vs autograd's mm + add)
    assert_close(lin.weight.main_grad, ref.weight.grad, "fused weight grad", terms=12)
    assert_close(lin.bias.grad, ref.bias.grad, "bias grad (plain autograd)", terms=12)
    for x, y in zip(xs, xr):
        assert_close(x.grad, y.grad, "input grad", terms=5)  # dy @ W: 5 output features


def test_unfused_linear_is_plain_autograd():
    lin = wgrad.Linear(4, 3, bias=False)
    assert lin.weight.wgrad_fusable and not wgrad.fuses(lin.weight)  # no DDP wrapper: nothing set
    lin(torch.randn(2, 4)).sum().backward()
    assert lin.weight.grad is not None and not hasattr(lin.weight, "grad_added_to_main_grad")


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_wgrad_zeroes_groups_without_rows(fused):
    g = torch.Generator().manual_seed(2)
    counts = [3, 0, 4, 0, 1]
    w = torch.randn(len(counts), 5, 7, generator=g)  # [G, out, in]
    x = torch.randn(sum(counts), 7, generator=g)
    dy = torch.randn(sum(counts), 5, generator=g)
    ref, s = torch.zeros_like(w), 0
    for i, c in enumerate(counts):
        ref[i] = dy[s:s + c].t() @ x[s:s + c]
        s += c
    # each group's grad sums its rows (at most 4); the accumulated one sums two micro-batches of them
    if not fused:
        assert_close(wgrad.grouped_wgrad(dy, x, counts, w), ref, "grouped wgrad", terms=4)
        return
    _fake_ddp_param(w)
    wgrad.grouped_wgrad(dy, x, counts, w)
    assert_close(w.main_grad, ref, "fused grouped wgrad", terms=4)
    assert not w.main_grad_stale
    wgrad.grouped_wgrad(dy, x, counts, w)  # second micro-batch accumulates
    assert_close(w.main_grad, 2 * ref, "fused grouped wgrad, 2 micro-batches", terms=8)


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_wgrad_single_launch_path_agrees(fused, monkeypatch):
    """The accelerator path (one torch._grouped_mm launch for the weight gradient) = the per-group GEMMs."""
    from megatron_ascend.platform import kernels
    g = torch.Generator().manual_seed(3)
    counts = [4, 0, 8, 4]
    w = torch.randn(len(counts), 8, 16, generator=g)
    x = torch.randn(sum(counts), 16, generator=g)
    dy = torch.randn(sum(counts), 8, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ref = wgrad.grouped_wgrad(dy, x, counts, w)  # CPU: per-group GEMMs
    monkeypatch.setattr(kernels, "per_group_weight_grad", lambda device: False)
    # one grouped GEMM vs per-group GEMMs: each group's grad sums its rows (at most 8), twice when accumulated
    if not fused:
        assert_close(wgrad.grouped_wgrad(dy, x, counts, w, offs), ref, "single-launch grouped wgrad", terms=8)
        return
    _fake_ddp_param(w)
    wgrad.grouped_wgrad(dy, x, counts, w, offs)
    wgrad.grouped_wgrad(dy, x, counts, w, offs)
    assert_close(w.main_grad, 2 * ref, "single-launch fused grouped wgrad, 2 micro-batches", terms=16)
    assert w.grad_added_to_main_grad


def _recompute_forms():
    from megatron_ascend.tensor_parallel.random import checkpoint, checkpoint_discard_output
    return {"plain": lambda fn, x: fn(x),
            "checkpoint": lambda fn, x: checkpoint(fn, x),
            "discard output": lambda fn, x: checkpoint_discard_output(lambda t: t * 1.0, x, fn)}


@pytest.mark.parametrize("form", ["checkpoint", "discard output"])
def test_fused_wgrad_under_recompute_writes_the_parameters_main_grad(form):
    """Under activation recompute (torch's non-reentrant checkpoint, the discard-output hooks) a tensor saved for
    backward comes back as a detached alias without the parameter's attributes: the fused linear, embedding and
    grouped linear must still write into the *parameter's* main_grad, exactly as without recompute. (Before the
    fix: AttributeError 'Tensor' object has no attribute 'main_grad' for the linear / embedding, and the grouped
    weight gradient silently left the fusion.)"""
    from megatron_ascend.moe.experts import grouped_linear
    g = torch.Generator().manual_seed(5)
    lin_w = torch.nn.Parameter(torch.randn(5, 8, generator=g))
    emb_w = torch.nn.Parameter(torch.randn(11, 8, generator=g))
    grp_w = torch.nn.Parameter(torch.randn(3, 4, 8, generator=g))  # rows of 32 bytes: grouped_mm
    ids = torch.randint(0, 11, (7,), generator=g)
    counts = [3, 0, 4]

    def fn(x):
        h = x + wgrad.embedding(ids, emb_w)
        return wgrad.linear(h, lin_w).sum() + grouped_linear(h, grp_w, counts).square().sum()

    results = {}
    for name in ("plain", form):
        for w in (lin_w, emb_w, grp_w):
            _fake_ddp_param(w)
            w.grad = None
        x = torch.randn(7, 8, generator=torch.Generator().manual_seed(9), requires_grad=True)
        _recompute_forms()[name](fn, x).backward()
        for w in (lin_w, emb_w, grp_w):
            assert w.grad_added_to_main_grad, (name, tuple(w.shape))  # the fused backward ran on the param
            assert not torch.isnan(w.main_grad).any(), (name, tuple(w.shape))
        results[name] = [w.main_grad.clone() for w in (lin_w, emb_w, grp_w)] + [x.grad.clone()]
    for a, b in zip(results[form], results["plain"]):
        assert torch.equal(a, b)  # recompute replays the same ops on the same values


def _tiny_cfg():
    from megatron_ascend.config import ModelConfig
    return ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, max_position_embeddings=64, init_method_std=0.05)


# fused vs unfused sum a weight's gradient contributions in another order: 2 micro-batches x 6 tokens, x 2 for the
# head / embedding (used by the main and the MTP loss); at TP2 (SP) x DP2 the reduction adds 2 x 2 partial sums
SUM_TERMS_SINGLE = 2 * 6 * 2
SUM_TERMS_DIST = SUM_TERMS_SINGLE * 2 * 2


def _grads_after_two_steps(fusion, par=None, pg=None, overlap=False, rank_batch=0, micro_batches=(0, 1)):
    """main_grad of every param after the second of two steps (2 micro-batches each); between steps the
    buffers are zeroed and then poisoned with NaN (lazy zeroing must never let that through).
    ``micro_batches`` picks which of the two run (tests/test_tolerance.py drops one to break the sum)."""
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    torch.manual_seed(0)
    m = DeepseekForCausalLM(_tiny_cfg(), par, pg)
    m.unused = wgrad.Linear(4, 4, bias=False)  # gets no gradient: must read as zeros after the reduction
    ddp = DistributedDataParallel(m, pg, overlap_grad_reduce=overlap, bucket_size=300 if overlap else None,
                                  gradient_accumulation_fusion=fusion)
    n_fused = sum(bool(getattr(p, "fuse_wgrad", False)) for p in m.parameters())
    for step in range(2):
        ddp.zero_grad_buffer()
        if fusion:
            for b in ddp.grad_buffers:
                b.grad_data.fill_(float("nan"))
        for mb in micro_batches:
            g = torch.Generator().manual_seed(100 * step + 10 * rank_batch + mb)
            ids = torch.randint(0, 64, (1, 6), generator=g)
            out = m(ids, labels=ids, loss_mask=torch.ones(1, 6))
            loss = out["lm_loss"].sum() + 0.3 * sum(x.sum() for x in out["mtp_losses"])
            if mb != micro_batches[-1]:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        ddp.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in m.named_parameters()}, n_fused


def test_ddp_fusion_equals_no_fusion_single_process():
    on, n_on = _grads_after_two_steps(True)
    off, n_off = _grads_after_two_steps(False)
    assert n_on > 10 and n_off == 0
    assert float(on["unused.weight"].abs().sum()) == 0.0
    # not bitwise everywhere: a weight used twice in one backward (head and embedding: main + MTP) sums its
    # two contributions in another order, and main_grad.addmm_ rounds differently from mm + add_
    for n in off:
        assert_close(on[n], off[n], n, terms=SUM_TERMS_SINGLE)


def _dist_body():
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.parallel_state import initialize_model_parallel
    par = ParallelConfig(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=2,
                         expert_tensor_parallel_size=1, sequence_parallel=True)
    pg = initialize_model_parallel(par)
    on, _ = _grads_after_two_steps(True, par, pg, overlap=True, rank_batch=pg.dp_rank)
    off, _ = _grads_after_two_steps(False, par, pg, overlap=True, rank_batch=pg.dp_rank)
    for n in off:
        assert_close(on[n], off[n], f"rank {pg.rank} {n}", terms=SUM_TERMS_DIST)
    return len(off), float(on["unused.weight"].abs().sum())


def test_ddp_fusion_equals_no_fusion_tp2_ep2_dp2_overlap():
    for compared, unused in run_distributed(4, _dist_body):
        assert compared > 20 and unused == 0.0
