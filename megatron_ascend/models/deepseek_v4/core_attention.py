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


class _SinkWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, comp, allowed, sinks, scale, window, block, want_mass):
        # q [b, s, H, D]; kv [b, s, D]; comp [b, n, D] (n may be 0); allowed bool [b, s, n] or None
        b, s, H, D = q.shape
        n = comp.shape[1]
        sdt = _softmax_dtype(q.dtype)
        out = torch.empty_like(q)
        mass = q.new_zeros((b, s, n), dtype=torch.float32) if want_mass and n else None
        probs = []
        blocks = query_blocks(s, window, block)
        sink = sinks.to(sdt).view(1, 1, H, 1)
        for a, e, k0 in blocks:
            r = e - a
            q2 = q[:, a:e].reshape(b, r * H, D)
            kw = kv[:, k0:e]
            lw = torch.bmm(q2, kw.transpose(1, 2)).view(b, r, H, e - k0).to(sdt).mul_(scale)
            lw.add_(_window_bias(a, e, k0, window, sdt, q.device))
            parts = [lw]
            if n:
                lc = torch.bmm(q2, comp.transpose(1, 2)).view(b, r, H, n).to(sdt).mul_(scale)
                lc.masked_fill_(~allowed[:, a:e].unsqueeze(2), float("-inf"))
                parts.append(lc)
            parts.append(sink.expand(b, r, H, 1))
            p = torch.softmax(torch.cat(parts, dim=-1), dim=-1)  # [b, r, H, Kw + n + 1]
            probs.append(p)
            pv = p.to(q.dtype).view(b, r * H, -1)
            o = torch.bmm(pv[..., : e - k0], kw)
            if n:
                o.baddbmm_(pv[..., e - k0: e - k0 + n], comp)
                if mass is not None:
                    mass[:, a:e] = p[..., e - k0: e - k0 + n].sum(2, dtype=torch.float32)
            out[:, a:e] = o.view(b, r, H, D)
        ctx.save_for_backward(q, kv, comp, *probs)
        ctx.meta = (scale, blocks)
        if mass is None:
            return out, None
        ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    def backward(ctx, do, _dmass):
        q, kv, comp, *probs = ctx.saved_tensors
        scale, blocks = ctx.meta
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
            pf = p.view(b, r * H, -1)
            pw, pc, ps = pf[..., :kw_n], pf[..., kw_n: kw_n + n], pf[..., kw_n + n:]
            dpw = torch.bmm(do2, kw.transpose(1, 2)).to(p.dtype)
            rowdot = (pw * dpw).sum(-1, keepdim=True)
            if n:
                dpc = torch.bmm(do2, comp.transpose(1, 2)).to(p.dtype)
                rowdot = rowdot + (pc * dpc).sum(-1, keepdim=True)
            dsw = (pw * (dpw - rowdot)).to(q.dtype)
            dsink -= (ps * rowdot).view(b, r, H).sum((0, 1))
            dq2 = torch.bmm(dsw, kw)
            dkv[:, k0:e] += torch.bmm(dsw.transpose(1, 2), q2).mul_(scale) + torch.bmm(
                pw.to(q.dtype).transpose(1, 2), do2)
            if n:
                dsc = (pc * (dpc - rowdot)).to(q.dtype)
                dq2.baddbmm_(dsc, comp)
                dcomp += torch.bmm(dsc.transpose(1, 2), q2).mul_(scale) + torch.bmm(
                    pc.to(q.dtype).transpose(1, 2), do2)
            dq[:, a:e] = dq2.mul_(scale).view(b, r, H, D)
        return dq, dkv, (dcomp if n else None), None, dsink, None, None, None, None


def sink_window_attention(q: torch.Tensor, kv: torch.Tensor, comp: Optional[torch.Tensor],
                          allowed: Optional[torch.Tensor], sinks: torch.Tensor, scale: float, window: int,
                          block: int = QUERY_BLOCK, want_mass: bool = False):
    """q [b, s, H, D]; kv [b, s, D]; comp [b, n, D] or None; allowed bool [b, s, n] (query t may attend entry
    w); sinks [H]. Returns (o [b, s, H, D], mass [b, s, n] fp32 summed over these heads, or None)."""
    if comp is None:
        comp = kv.new_zeros(kv.shape[0], 0, kv.shape[-1])
        allowed = None
    return _SinkWindowAttention.apply(q, kv, comp, allowed, sinks, scale, window, block, want_mass)
