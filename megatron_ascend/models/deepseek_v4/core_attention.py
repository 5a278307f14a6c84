"""DeepSeek-V4 core attention: one shared key/value head, a causal sliding window, compressed entries and a
per-head sink, computed exactly, block by block over the queries.

For query t (one token, every head h):

    keys   = window {j : t - window < j <= t}  U  compressed entries {w : allowed[t, w]}     (K = V = kv)
    logits = q_h . k * scale  (-inf outside the keys),  plus the sink logit ``sinks[h]`` (zero value)
    o_h    = softmax(logits incl. sink) @ values       (the sink takes probability mass, adds no value)

``allowed`` is the layer's rule: HCA every visible entry, CSA the indexer's selection (compressor.py /
indexer.py); sliding layers have no entries. This equals transformers' eager_attention_forward with its
[s, s + n] mask, without ever building an [s, s] tensor: query block [a, e) reads keys [a - window + 1, e)
and the n = s / ratio entries, so the probabilities kept for backward are ``heads x (block + window + n + 1)``
per token -- linear in s for sliding layers, s * s / ratio for compressed ones.

The autograd function keeps q, kv, the entries and each block's probabilities (fp32 for half inputs), and
its backward runs block by block too (no full-size zero-filled gradient per block). It can also return the
probability mass of every entry summed over heads (the indexer loss's teacher), a by-product of the softmax.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...platform import kernels

QUERY_BLOCK = 128  # query rows per block (blocks also read window - 1 earlier keys)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def query_blocks(s: int, window: int, block: int) -> List[Tuple[int, int, int]]:
    """(a, e, k0): query rows [a, e) read window keys [k0, e)."""
    return [(a, min(a + block, s), max(0, a - window + 1)) for a in range(0, s, block)]


def _window_bias(a: int, e: int, k0: int, window: int, dtype, device) -> torch.Tensor:
    """[e - a, 1, e - k0]: 0 where t - window < j <= t, -inf elsewhere."""
    t = torch.arange(a, e, device=device).view(-1, 1)
    j = torch.arange(k0, e, device=device).view(1, -1)
    ok = (j <= t) & (j > t - window)
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf")).unsqueeze(1)


def _gather(comp: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """comp [b, n, D], idx [b, r, k] (-1 = none) -> (the picked entries [b * r, k, D] (entry 0 for -1), their
    row indices in comp viewed [b * n, D])."""
    b, n, D = comp.shape
    flat = (idx.clamp_min(0) + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
    return comp.reshape(b * n, D).index_select(0, flat).view(-1, idx.shape[-1], D), flat


class _SinkWindowAttention(torch.autograd.Function):
    """``sel`` says which entries a query uses: bool [b, s, n] (dense: every entry is scored, the others masked)
    or long [b, s, k] entry indices, -1 for none (gathered: only the k picked entries are scored and kept)."""

    @staticmethod
    def forward(ctx, q, kv, comp, sel, sinks, scale, window, block, want_mass):
        b, s, H, D = q.shape
        n = comp.shape[1]
        gathered = n > 0 and sel.dtype != torch.bool
        nc = sel.shape[-1] if n else 0  # compressed logits per query
        sdt = _softmax_dtype(q.dtype)
        out = torch.empty_like(q)
        mass = q.new_zeros((b, s, n), dtype=torch.float32) if want_mass and n else None
        probs = []
        blocks = query_blocks(s, window, block)
        sink = sinks.to(sdt).view(1, 1, H, 1)
        for a, e, k0 in blocks:
            r, kw_n = e - a, e - k0
            q2 = q[:, a:e].reshape(b, r * H, D)
            kw = kv[:, k0:e]
            lw = torch.bmm(q2, kw.transpose(1, 2)).view(b, r, H, kw_n).to(sdt).mul_(scale)
            lw.add_(_window_bias(a, e, k0, window, sdt, q.device))
            parts = [lw]
            if gathered:
                idx = sel[:, a:e]
                ks, _ = _gather(comp, idx)
                lc = torch.bmm(q[:, a:e].reshape(b * r, H, D), ks.transpose(1, 2)).view(b, r, H, nc).to(sdt).mul_(scale)
                lc.masked_fill_((idx < 0).unsqueeze(2), float("-inf"))
                parts.append(lc)
            elif n:
                lc = torch.bmm(q2, comp.transpose(1, 2)).view(b, r, H, n).to(sdt).mul_(scale)
                lc.masked_fill_(~sel[:, a:e].unsqueeze(2), float("-inf"))
                parts.append(lc)
            parts.append(sink.expand(b, r, H, 1))
            p = torch.softmax(torch.cat(parts, dim=-1), dim=-1)  # [b, r, H, Kw + nc + 1]
            probs.append(p)
            pv = p.to(q.dtype)
            o = torch.bmm(pv.view(b, r * H, -1)[..., :kw_n], kw)
            if gathered:
                o.view(b * r, H, D).baddbmm_(pv.view(b * r, H, -1)[..., kw_n: kw_n + nc], ks)
            elif n:
                o.baddbmm_(pv.view(b, r * H, -1)[..., kw_n: kw_n + n], comp)
            if mass is not None:
                pc = p[..., kw_n: kw_n + nc].sum(2, dtype=torch.float32)  # [b, r, nc]
                if gathered:
                    mass[:, a:e].scatter_add_(-1, idx.clamp_min(0), pc.masked_fill(idx < 0, 0.0))
                else:
                    mass[:, a:e] = pc
            out[:, a:e] = o.view(b, r, H, D)
        ctx.save_for_backward(q, kv, comp, sel if gathered else None, *probs)
        ctx.meta = (scale, blocks, gathered, nc, sinks.dtype)
        if mass is None:
            return out, None
        ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    def backward(ctx, do, _dmass):
        q, kv, comp, sel, *probs = ctx.saved_tensors
        scale, blocks, gathered, nc, sink_dtype = ctx.meta
        b, s, H, D = q.shape
        n = comp.shape[1]
        dq = torch.empty_like(q)
        dkv = torch.zeros_like(kv)
        dcomp = torch.zeros_like(comp)
        dsink = torch.zeros(H, dtype=probs[0].dtype, device=q.device)
        do = do.contiguous()
        for (a, e, k0), p in zip(blocks, probs):
            r, kw_n = e - a, e - k0
            q2 = q[:, a:e].reshape(b, r * H, D)
            do2 = do[:, a:e].reshape(b, r * H, D)
            kw = kv[:, k0:e]
            pw = p.view(b, r * H, -1)[..., :kw_n]
            ps = p[..., kw_n + nc:].reshape(b, r * H, 1)
            dpw = torch.bmm(do2, kw.transpose(1, 2)).to(p.dtype)
            rowdot = (pw * dpw).sum(-1, keepdim=True)                       # [b, r*H, 1]
            if gathered:
                ks, flat = _gather(comp, sel[:, a:e])
                pc = p.view(b * r, H, -1)[..., kw_n: kw_n + nc]
                dpc = torch.bmm(do2.reshape(b * r, H, D), ks.transpose(1, 2)).to(p.dtype)
                rowdot = rowdot + (pc * dpc).sum(-1, keepdim=True).view(b, r * H, 1)
            elif n:
                pc = p.view(b, r * H, -1)[..., kw_n: kw_n + n]
                dpc = torch.bmm(do2, comp.transpose(1, 2)).to(p.dtype)
                rowdot = rowdot + (pc * dpc).sum(-1, keepdim=True)
            dsw = (pw * (dpw - rowdot)).to(q.dtype)
            dsink -= (ps * rowdot).view(b, r, H).sum((0, 1))
            dq2 = torch.bmm(dsw, kw)
            dkv[:, k0:e] += torch.bmm(dsw.transpose(1, 2), q2).mul_(scale) + torch.bmm(
                pw.to(q.dtype).transpose(1, 2), do2)
            if gathered:
                dsc = (pc * (dpc - rowdot.view(b * r, H, 1))).to(q.dtype)     # [b*r, H, nc]
                dq2.view(b * r, H, D).baddbmm_(dsc, ks)
                dks = torch.bmm(dsc.transpose(1, 2), q2.reshape(b * r, H, D)).mul_(scale) + torch.bmm(
                    pc.to(q.dtype).transpose(1, 2), do2.reshape(b * r, H, D))   # [b*r, nc, D]
                dcomp.view(b * n, D).index_add_(0, flat, dks.reshape(-1, D))
            elif n:
                dsc = (pc * (dpc - rowdot)).to(q.dtype)
                dq2.baddbmm_(dsc, comp)
                dcomp += torch.bmm(dsc.transpose(1, 2), q2).mul_(scale) + torch.bmm(
                    pc.to(q.dtype).transpose(1, 2), do2)
            dq[:, a:e] = dq2.mul_(scale).view(b, r, H, D)
        return dq, dkv, (dcomp if n else None), None, dsink.to(sink_dtype), None, None, None, None


def sink_window_attention(q: torch.Tensor, kv: torch.Tensor, comp: Optional[torch.Tensor],
                          sel: Optional[torch.Tensor], sinks: torch.Tensor, scale: float, window: int,
                          block: int = QUERY_BLOCK, want_mass: bool = False):
    """q [b, s, H, D]; kv [b, s, D]; comp [b, n, D] or None; ``sel``: bool [b, s, n] (query t may attend entry
    w) or long [b, s, k] (the entries it attends, -1 for none); sinks [H]. Returns (o [b, s, H, D], the
    attention mass on each entry summed over these heads [b, s, n] fp32 when ``want_mass``, else None)."""
    if comp is None:
        if not want_mass:  # a sliding layer: the kernel table's sliding_attention (torch_npu on Ascend >= 7.3)
            return kernels.get("sliding_attention")(q, kv, sinks, scale, window, block), None
        comp = kv.new_zeros(kv.shape[0], 0, kv.shape[-1])
        sel = None
    return _SinkWindowAttention.apply(q, kv, comp, sel, sinks, scale, window, block, want_mass)


@kernels.reference("sliding_attention")
def sliding_attention(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, scale: float, window: int,
                      block: int = QUERY_BLOCK) -> torch.Tensor:
    """The reference of the table's ``sliding_attention``: the window-and-sink attention above without
    compressed entries. q [b, s, H, D], kv [b, s, D], sinks [H] -> o [b, s, H, D]."""
    comp = kv.new_zeros(kv.shape[0], 0, kv.shape[-1])
    return _SinkWindowAttention.apply(q, kv, comp, None, sinks, scale, window, block, False)[0]
