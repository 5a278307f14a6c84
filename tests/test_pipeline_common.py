"""Shared pieces of the pipeline tests: a generic toy model (embedding -> residual MLP blocks -> head, blocks
keyed by global index, optional tied head, an MTP-like second head that re-embeds tokens with the shared
embedding, and an aux loss injected inside the blocks' autograd), its data, and the published schedule orders
written from the papers' definitions (independently of megatron_ascend.pipeline_parallel). Also the pure tests
of the stage split.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_ascend.config import ConfigError
from megatron_ascend.pipeline_parallel import (mark_shared_embedding, model_chunk_specs, stage_layer_ids)

V, H = 23, 12
AUX_COEFF = 0.01
MTP_COEFF = 0.3


# ----------------------------------------------------------------------------------------------
# toy model
# ----------------------------------------------------------------------------------------------
def _init(shape, name, dtype, std=0.3):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * std)


class AuxInject(torch.autograd.Function):
    """Identity on x; in backward adds d(aux)/d(aux) = 1 to the aux loss (MoEAuxLossAutoScaler's trick)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x.clone()

    @staticmethod
    def backward(ctx, gx):
        (aux,) = ctx.saved_tensors
        return gx, torch.ones_like(aux)


class Block(nn.Module):
    def __init__(self, i, dtype):
        super().__init__()
        self.w1 = _init((2 * H, H), f"layers.{i}.w1", dtype)
        self.w2 = _init((H, 2 * H), f"layers.{i}.w2", dtype)

    def forward(self, h):  # [s, b, H]
        y = h + torch.tanh(h @ self.w1.t()) @ self.w2.t()
        aux = AUX_COEFF * (y * y).mean()
        return AuxInject.apply(y, aux)


class ToyChunk(nn.Module):
    """One pipeline chunk of the toy model. Forward returns hidden [s, b, H], or on the last stage a dict of
    per-token losses [b, s]."""

    def __init__(self, layer_ids, pre_process, post_process, tie=False, mtp=False, dtype=torch.float64,
                 pp_size=1):
        super().__init__()
        self.pre, self.post, self.tie, self.mtp = pre_process, post_process, tie, mtp
        needs_embedding = pre_process or (post_process and (tie or mtp))
        if needs_embedding:
            self.embed_tokens = _init((V, H), "embed_tokens", dtype)
            if not pre_process:  # last stage's own copy: start it wrong so the sync is tested
                with torch.no_grad():
                    self.embed_tokens.mul_(0.0)
            if (tie or mtp) and pp_size > 1:
                mark_shared_embedding(self.embed_tokens, canonical=pre_process)
        self.layers = nn.ModuleDict({str(i): Block(i, dtype) for i in layer_ids})
        if post_process and not tie:
            self.lm_head = _init((V, H), "lm_head", dtype)
        if post_process and mtp:
            self.mtp_proj = _init((H, 2 * H), "mtp_proj", dtype)
        self.input_tensor = None

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, ids):
        h = F.embedding(ids, self.embed_tokens).transpose(0, 1) if self.pre else self.input_tensor
        for i in sorted(self.layers, key=int):
            h = self.layers[i](h)
        if not self.post:
            return h
        head = self.embed_tokens if self.tie else self.lm_head
        logits = (h @ head.t()).transpose(0, 1)  # [b, s, V]
        out = {"logits": logits}
        if self.mtp:  # predict token t+2 from h_t and the embedding of token t+1 (shared embedding)
            nxt = torch.roll(ids, -1, dims=1)
            e = F.embedding(nxt, self.embed_tokens).transpose(0, 1)
            h2 = torch.tanh(torch.cat([h, e], -1) @ self.mtp_proj.t())
            out["mtp_logits"] = (h2 @ head.t()).transpose(0, 1)
        return out


def toy_loss(out, batch):
    """Megatron per-token form: (sum of masked token losses + MTP term, token count, log dict)."""
    labels, mask = batch["labels"], batch["loss_mask"]
    ce = F.cross_entropy(out["logits"].reshape(-1, V), labels.reshape(-1), reduction="none").view_as(mask)
    lm_sum = (ce * mask).sum()
    loss_sum = lm_sum
    log = {"lm_sum": lm_sum.detach(), "tokens": mask.sum().detach()}
    if "mtp_logits" in out:
        l2 = torch.roll(labels, -1, dims=1)
        m2 = mask.clone()
        m2[:, -1] = 0
        ce2 = F.cross_entropy(out["mtp_logits"].reshape(-1, V), l2.reshape(-1), reduction="none").view_as(mask)
        mtp_sum = (ce2 * m2).sum()
        loss_sum = loss_sum + MTP_COEFF * mtp_sum
        log["mtp_sum"] = mtp_sum.detach()
    return loss_sum, mask.sum(), log


def toy_forward_step(data_iterator, chunk):
    batch = next(data_iterator)
    out = chunk(batch["input_ids"])
    return out, (lambda o: toy_loss(o, batch))


def make_batches(n, seed=0, fixed_len=None, b=2):
    """n microbatches; sequence length varies per microbatch (SFT-like) unless fixed_len."""
    out = []
    for j in range(n):
        g = torch.Generator().manual_seed(seed * 1000 + j)
        s = fixed_len or (4 + (j * 5) % 4)
        ids = torch.randint(0, V, (b, s), generator=g)
        labels = torch.randint(0, V, (b, s), generator=g)
        mask = (torch.rand(b, s, generator=g) > 0.25).double()
        mask[0, 0] = 1.0
        out.append({"input_ids": ids, "labels": labels, "loss_mask": mask})
    return out


def build_chunks(num_layers, pp, pp_rank, vp, tie, mtp, dtype, first=None, last=None):
    return [ToyChunk(c.layer_ids, c.pre_process, c.post_process, tie, mtp, dtype, pp)
            for c in model_chunk_specs(num_layers, pp, pp_rank, vp, first, last)]


def named_grads(chunks):
    out = {}
    for c in chunks:
        for n, p in c.named_parameters():
            out[n] = None if p.grad is None else p.grad.detach().clone()
    return out


# ----------------------------------------------------------------------------------------------
# published schedule orders (written from the definitions, not from the implementation)
# ----------------------------------------------------------------------------------------------
def published_1f1b_order(p, r, m):
    """PipeDream-flush / Megatron 1F1B (Narayanan et al. 2021, Fig. 4 top): rank r first runs p-r-1 forwards
    (all m if fewer), then alternates one forward and one backward, then drains the backwards."""
    fwd = [("F", i, 0) for i in range(m)]
    bwd = [("B", i, 0) for i in range(m)]
    return _merge(fwd, bwd, min(p - r - 1, m))


def published_interleaved_order(p, r, m, v, n=None):
    """Megatron interleaved 1F1B (Narayanan et al. 2021, Fig. 4 bottom; Megatron-Core's schedule table):
    microbatches go in groups of n (default p; Megatron's microbatch_group_size_per_vp_stage), the last group
    taking whatever is left; a group runs through chunk 0, then chunk 1, ... (forward) and through chunk v-1 down
    to chunk 0 (backward). Warm-up is 2(p-r-1) + (v-1)n forwards (capped at m v), then 1F1B."""
    n = n or p
    fwd, bwd = [], []
    for g0 in range(0, m, n):
        group = range(g0, m) if g0 + n >= m else range(g0, g0 + n)
        fwd += [("F", j, c) for c in range(v) for j in group]
        bwd += [("B", j, c) for c in reversed(range(v)) for j in group]
    return _merge(fwd, bwd, min(2 * (p - r - 1) + (v - 1) * n, m * v))


def _merge(fwd, bwd, warmup):
    seq = list(fwd[:warmup])
    for f, b in zip(fwd[warmup:], bwd):
        seq += [f, b]
    return seq + bwd[len(fwd) - warmup:]


# ----------------------------------------------------------------------------------------------
# pure tests: stage split and the hand-checked orders
# ----------------------------------------------------------------------------------------------
def test_stage_layer_ids_even_interleaved_and_uneven():
    # Megatron's example: 16 layers, PP4, VP2 -> rank 0 holds [0,1] and [8,9], rank 1 [2,3] and [10,11]
    assert stage_layer_ids(16, 4, 0, 2, 0) == [0, 1] and stage_layer_ids(16, 4, 0, 2, 1) == [8, 9]
    assert stage_layer_ids(16, 4, 1, 2, 0) == [2, 3] and stage_layer_ids(16, 4, 3, 2, 1) == [14, 15]
    # reference probe in megatron_anchors.md: 8 layers PP2 VP2 -> pp0 [[1,2],[5,6]] (1-based)
    assert [stage_layer_ids(8, 2, 0, 2, v) for v in range(2)] == [[0, 1], [4, 5]]
    assert stage_layer_ids(6, 1, 0) == list(range(6))
    # uneven: 1 layer on the first stage, 3 on the last, the rest even
    assert [stage_layer_ids(10, 4, p, first=1, last=3) for p in range(4)] == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [stage_layer_ids(6, 2, p, first=2) for p in range(2)] == [[0, 1], [2, 3, 4, 5]]
    # every layer exactly once, in model order, for many layouts
    for L, pp, vp, first, last in [(16, 4, 2, None, None), (12, 2, 3, None, None), (14, 4, 1, 2, 4),
                                   (20, 4, 2, 2, 6), (9, 3, 1, None, None)]:
        blocks = [stage_layer_ids(L, pp, p, vp, v, first, last) for v in range(vp) for p in range(pp)]
        assert sum(blocks, []) == list(range(L)), (L, pp, vp, first, last)
    specs = model_chunk_specs(8, 2, 0, 2)
    assert [(s.pre_process, s.post_process) for s in specs] == [(True, False), (False, False)]
    specs = model_chunk_specs(8, 2, 1, 2)
    assert [(s.pre_process, s.post_process) for s in specs] == [(False, False), (False, True)]


def test_stage_split_errors_name_the_values():
    with pytest.raises(ConfigError, match="num-layers 10 does not split"):
        stage_layer_ids(10, 4, 0)
    with pytest.raises(ConfigError, match="remaining"):
        stage_layer_ids(10, 4, 0, first=2, last=3)
    with pytest.raises(ConfigError, match="pipeline rank 4 is outside"):
        stage_layer_ids(8, 4, 4)
    with pytest.raises(ConfigError, match="virtual pipeline rank 2"):
        stage_layer_ids(8, 2, 0, 2, 2)


def test_published_orders_hand_checked():
    # Narayanan et al. Fig. 4 (top): p=4, m=8, device 1 = F1 F2 F3 F4 B1 F5 B2 ... (0-based here)
    F_, B_ = "F", "B"
    assert published_1f1b_order(4, 0, 8) == [(F_, 0, 0), (F_, 1, 0), (F_, 2, 0), (F_, 3, 0), (B_, 0, 0),
                                             (F_, 4, 0), (B_, 1, 0), (F_, 5, 0), (B_, 2, 0), (F_, 6, 0),
                                             (B_, 3, 0), (F_, 7, 0), (B_, 4, 0), (B_, 5, 0), (B_, 6, 0), (B_, 7, 0)]
    assert published_1f1b_order(4, 3, 2) == [(F_, 0, 0), (B_, 0, 0), (F_, 1, 0), (B_, 1, 0)]
    assert published_1f1b_order(4, 0, 2) == [(F_, 0, 0), (F_, 1, 0), (B_, 0, 0), (B_, 1, 0)]
    # p=2, m=4, v=2, worked by hand from the schedule table (mb, chunk)
    assert published_interleaved_order(2, 0, 4, 2) == [
        (F_, 0, 0), (F_, 1, 0), (F_, 0, 1), (F_, 1, 1), (F_, 2, 0), (B_, 0, 1), (F_, 3, 0), (B_, 1, 1),
        (F_, 2, 1), (B_, 0, 0), (F_, 3, 1), (B_, 1, 0), (B_, 2, 1), (B_, 3, 1), (B_, 2, 0), (B_, 3, 0)]
    # p=2, m=3 (not a multiple of p), v=2, groups of n=3: one group; warm-up 2 + 3 on rank 0, 3 on rank 1
    assert published_interleaved_order(2, 0, 3, 2, 3) == [
        (F_, 0, 0), (F_, 1, 0), (F_, 2, 0), (F_, 0, 1), (F_, 1, 1), (F_, 2, 1), (B_, 0, 1), (B_, 1, 1),
        (B_, 2, 1), (B_, 0, 0), (B_, 1, 0), (B_, 2, 0)]
    assert published_interleaved_order(2, 1, 3, 2, 3) == [
        (F_, 0, 0), (F_, 1, 0), (F_, 2, 0), (F_, 0, 1), (B_, 0, 1), (F_, 1, 1), (B_, 1, 1), (F_, 2, 1),
        (B_, 2, 1), (B_, 0, 0), (B_, 1, 0), (B_, 2, 0)]
    assert published_interleaved_order(2, 1, 4, 2) == [
        (F_, 0, 0), (F_, 1, 0), (F_, 0, 1), (B_, 0, 1), (F_, 1, 1), (B_, 1, 1), (F_, 2, 0), (B_, 0, 0),
        (F_, 3, 0), (B_, 1, 0), (F_, 2, 1), (B_, 2, 1), (F_, 3, 1), (B_, 3, 1), (B_, 2, 0), (B_, 3, 0)]
