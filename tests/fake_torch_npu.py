"""A fake ``torch_npu`` (and ``mindspeed``) for CPU tests: every operator the kernel table binds, with the
documented signature (names, order, defaults, keyword-only marks of the op-plugin schema, by TorchNPU release),
argument checks from the documentation (../shared/reference/ascend_npu.md: shapes, layouts, dtypes, masks, scale,
keep_prob, group lists), the documented outputs (shapes, dtypes, the 7-tuple of npu_fusion_attention, the inverse
map of npu_moe_token_permute) computed with plain PyTorch on CPU, and autograd only where torch_npu has it (ODY:
npu_grouped_matmul and npu_moe_gating_top_k are forward-only; npu_moe_token_permute / unpermute from 7.2).

Every call is recorded in ``module.calls`` as (op name, {argument: value or (shape, dtype)}).

    with install(version="7.2", mindspeed=False) as npu:   # sys.modules["torch_npu"], torch.npu
        kernels.configure(kind="npu")
        ...
        npu.calls

A documentation violation raises ``FakeNpuError`` (the real op's TORCH_CHECK would): so the bindings' layouts,
masks and group lists are checked on every call, then the value is compared with the reference by the caller.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import List, Optional

import torch
import torch.nn.functional as F

INT_MAX = 2147483647
VERSIONS = ("6.0", "7.0", "7.1", "7.2", "7.3")


class FakeNpuError(RuntimeError):
    """A call the real operator would reject (documented constraint)."""


def _check(cond, msg):
    if not cond:
        raise FakeNpuError(msg)


def _summary(v):
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        return [(tuple(t.shape), t.dtype) for t in v]
    return v


def _ver(v: str):
    return tuple(int(x) for x in v.split("."))


class _Rec:
    def __init__(self):
        self.calls: List[tuple] = []

    def record(*args, **kw):  # (self, name, **arguments): an argument may itself be called "self"
        rec, name = args
        rec.calls.append((name, {k: _summary(v) for k, v in kw.items()}))

    def names(self):
        return [c[0] for c in self.calls]


# -- npu_fusion_attention --------------------------------------------------------------------------------------
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _to_bnsd(x, layout, n):
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return x
    if layout == "BSH":
        b, s, h = x.shape
        return x.view(b, s, n, h // n).permute(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.view(s, b, n, h // n).permute(1, 2, 0, 3)
    raise AssertionError(layout)


def _from_bnsd(o, layout):
    b, n, s, d = o.shape
    if layout == "BSND":
        return o.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return o
    if layout == "BSH":
        return o.permute(0, 2, 1, 3).reshape(b, s, n * d)
    return o.permute(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _keep(sq, skv, sparse_mode, mask, pre, nxt, device):
    """bool [.., sq, skv] True = attended, for one (batch, head) problem: the documented sparse modes."""
    i = torch.arange(sq, device=device).view(-1, 1)
    j = torch.arange(skv, device=device).view(1, -1)
    if sparse_mode == 0:
        keep = ~mask if mask is not None else torch.ones(sq, skv, dtype=torch.bool, device=device)
        return keep & (j - i >= -pre) & (j - i <= nxt)
    if sparse_mode == 1:
        return ~mask
    if sparse_mode == 2:
        return j <= i
    if sparse_mode == 3:
        return j <= i + (skv - sq)
    if sparse_mode == 4:
        d = j - i - (skv - sq)
        return (d >= -pre) & (d <= nxt)
    raise FakeNpuError(f"sparse_mode {sparse_mode} is not modelled by the fake")


def _attend(q, k, v, keep, scale, sink=None):
    """q [N, Sq, D], k [Nkv, Skv, D], v [Nkv, Skv, Dv]; keep broadcastable to [N, Sq, Skv]."""
    n, nkv = q.shape[0], k.shape[0]
    if nkv != n:
        k = k.repeat_interleave(n // nkv, 0)
        v = v.repeat_interleave(n // nkv, 0)
    w = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    w = w.masked_fill(~keep, float("-inf"))
    if sink is not None:
        w = torch.cat([w, sink.float().view(n, 1, 1).expand(n, w.shape[1], 1)], dim=-1)
        p = torch.softmax(w, dim=-1)[..., :-1]
    else:
        p = torch.softmax(w, dim=-1)
    return torch.matmul(p, v.float()).to(q.dtype)


def _make_fa(rec: _Rec, version):
    v = _ver(version)

    def fa(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob, pre_tockens,
           next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel,
           sync, **extra):
        extra = {k: x for k, x in extra.items() if x is not None and x != ""}
        rec.record("npu_fusion_attention", query=query, key=key, value=value, head_num=head_num,
                   input_layout=input_layout, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                   pre_tockens=pre_tockens, next_tockens=next_tockens, actual_seq_qlen=actual_seq_qlen,
                   actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, **extra)
        layout = str(input_layout).upper()
        _check(layout in _LAYOUTS, f"input_layout {input_layout!r} not in {_LAYOUTS}")
        for t in (query, key, value):
            _check(t.dim() in (3, 4), "query/key/value must be 3-D or 4-D")
            _check(t.dtype in (torch.float16, torch.bfloat16, torch.float32), f"dtype {t.dtype}")
        _check(query.dtype == key.dtype == value.dtype, "q, k, v must share a dtype")
        _check(isinstance(head_num, int) and head_num > 0, f"head_num {head_num} must be a positive int")
        _check(0 < keep_prob <= 1, f"keep_prob {keep_prob} not in (0, 1]")
        _check(keep_prob == 1.0, "the fake does not model dropout")
        _check(padding_mask is None, "padding_mask is not supported (暂不支持)")
        _check(pse is None and prefix is None, "pse / prefix are not modelled")
        _check(isinstance(scale, float), f"scale must be a float, got {type(scale).__name__}")
        _check(extra.get("softmax_layout", "") in ("", "TND") and (extra.get("softmax_layout") != "TND"
                                                                    or str(input_layout).upper() == "TND"),
               "softmax_layout 'TND' only with a TND input")
        sink = extra.get("sink")
        if sink is not None:
            _check(sink.dtype == torch.float32 and sink.shape == (head_num,), "sink: fp32 [head_num]")
        if atten_mask is not None:
            _check(atten_mask.dtype in (torch.bool, torch.uint8), f"atten_mask dtype {atten_mask.dtype}")
            if sparse_mode in (2, 3, 4, 7, 8):
                _check(tuple(atten_mask.shape) == (2048, 2048),
                       f"sparse_mode {sparse_mode} takes the compressed 2048x2048 mask, got {tuple(atten_mask.shape)}")
                _check(bool((atten_mask == torch.triu(torch.ones_like(atten_mask), 1)).all()),
                       "the compressed mask must be triu(ones, diagonal=1)")
        if layout == "TND":
            _check(sparse_mode in (0, 1, 2, 3, 4, 6, 7, 8), f"TND sparse_mode {sparse_mode} (5 is rejected)")
            for name, lst in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
                _check(isinstance(lst, list) and lst and all(isinstance(x, int) for x in lst),
                       f"{name} must be a non-empty host list of ints (cumulative ends, no leading 0), got "
                       f"{type(lst).__name__}")
                _check(all(a <= b for a, b in zip(lst, lst[1:])), f"{name} must be non-decreasing")
                _check(lst[0] > 0, f"{name} starts with 0: pass cu_seqlens[1:] (no leading 0)")
                _check(len(lst) <= 2048, f"{name}: at most 2K sequences")
            _check(len(actual_seq_qlen) == len(actual_seq_kvlen), "actual_seq_qlen / kvlen lengths differ")
            t, n, dq = query.shape
            _check(actual_seq_qlen[-1] == t and actual_seq_kvlen[-1] == key.shape[0],
                   f"the cumulative lengths must end at T ({t}), got {actual_seq_qlen[-1]}")
            _check(n == head_num, f"TND: query heads {n} != head_num {head_num}")
            nkv, dk, dv = key.shape[1], key.shape[2], value.shape[2]
        else:
            _check(0 <= sparse_mode <= 6, f"sparse_mode {sparse_mode} outside [0, 6] for {layout}")
            if layout in ("BSND", "BNSD"):
                n = query.shape[2] if layout == "BSND" else query.shape[1]
                _check(n == head_num, f"{layout}: query heads {n} != head_num {head_num}")
                dq, dk, dv = query.shape[3], key.shape[3], value.shape[3]
            else:
                _check(query.shape[-1] % head_num == 0, f"H {query.shape[-1]} not a multiple of head_num")
                dq = query.shape[-1] // head_num
                dk = dq
                dv = value.shape[-1] // (key.shape[-1] // dq)
        _check(dq == dk and dk >= dv and 1 <= dq <= 768, f"need Dq == Dk >= Dv, D <= 768 (got {dq}, {dk}, {dv})")
        if layout == "TND":
            _check(head_num % nkv == 0 and head_num <= 256, "Nq % Nkv == 0, Nq <= 256")
            outs, smax = [], []
            start = 0
            for end in actual_seq_qlen:
                qs, ks, vs = (x[start:end].transpose(0, 1) for x in (query, key, value))  # [N, S, D]
                sq = end - start
                m = None if atten_mask is None else atten_mask[:sq, :sq]
                keep = _keep(sq, sq, sparse_mode, m, pre_tockens, next_tockens, query.device) \
                    if atten_mask is not None else torch.ones(sq, sq, dtype=torch.bool)
                outs.append(_attend(qs, ks, vs, keep, scale, sink).transpose(0, 1))
                start = end
            out = torch.cat(outs, 0)
            stat = torch.zeros(query.shape[0], head_num, 8, dtype=torch.float32)
        else:
            if layout in ("BSND", "BNSD"):
                q4, k4, v4 = (_to_bnsd(x, layout, None) for x in (query, key, value))
            else:
                nkv = key.shape[-1] // dq
                q4, k4, v4 = (_to_bnsd(query, layout, head_num), _to_bnsd(key, layout, nkv),
                              _to_bnsd(value, layout, nkv))
            b, nq, sq, _ = q4.shape
            skv = k4.shape[2]
            _check(nq % k4.shape[1] == 0 and nq <= 256, "Nq % Nkv == 0, Nq <= 256")
            if atten_mask is None:
                keep = torch.ones(sq, skv, dtype=torch.bool)
            elif sparse_mode in (2, 3, 4):
                keep = _keep(sq, skv, sparse_mode, None, pre_tockens, next_tockens, query.device)
            else:
                shp = tuple(atten_mask.shape)
                _check(shp in ((b, nq, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv)),
                       f"atten_mask shape {shp}: BNSS, B1SS, 11SS or SS of ({b}, {nq}, {sq}, {skv})")
                m = atten_mask.bool()
                keep = _keep(sq, skv, sparse_mode, m, pre_tockens, next_tockens, query.device)
            keep = keep if keep.dim() == 4 else keep.view(1, 1, sq, skv)
            keep = keep.expand(b, nq, sq, skv)
            o = torch.stack([_attend(q4[i], k4[i], v4[i], keep[i], scale, sink) for i in range(b)])
            out = _from_bnsd(o, layout)
            stat = torch.zeros(b, nq, sq, 8, dtype=torch.float32)
        numels = out.numel()
        return out, stat, stat.clone(), torch.empty(0), 0, 0, int(numels)

    # the schema of each release (§1.1): 7.2 appends softmax_layout, 7.3 sink -- an unknown keyword is a TypeError
    if v >= (7, 3):
        def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                                 atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX,
                                 next_tockens=INT_MAX, inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                                 softmax_layout="", sink=None):
            return fa(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                      sparse_mode, gen_mask_parallel, sync, softmax_layout=softmax_layout, sink=sink)
    elif v >= (7, 2):
        def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                                 atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX,
                                 next_tockens=INT_MAX, inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                                 softmax_layout=""):
            return fa(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                      sparse_mode, gen_mask_parallel, sync, softmax_layout=softmax_layout)
    else:
        def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                                 atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX,
                                 next_tockens=INT_MAX, inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
            return fa(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                      sparse_mode, gen_mask_parallel, sync)
    return npu_fusion_attention


# -- the other operators ---------------------------------------------------------------------------------------
_RMS_PAIRS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
              (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}


def _make_ops(rec: _Rec, version: str):
    v = _ver(version)
    ops = {"npu_fusion_attention": _make_fa(rec, version)}

    def npu_rms_norm(self, gamma, epsilon=1e-06):
        x = self
        rec.record("npu_rms_norm", self=x, gamma=gamma, epsilon=epsilon)
        _check(2 <= x.dim() <= 8, f"npu_rms_norm: x has {x.dim()} dims (2-8)")
        _check(tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim():]), "gamma must match x's last dims")
        _check((x.dtype, gamma.dtype) in _RMS_PAIRS, f"dtype pair {x.dtype} x {gamma.dtype}")
        dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
        rstd = torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd
    ops["npu_rms_norm"] = npu_rms_norm

    def _rotary(x, r1, r2, rotary_mode):
        rec.record("npu_rotary_mul", self=x, r1=r1, r2=r2, rotary_mode=rotary_mode)
        _check(x.dim() in (3, 4), "npu_rotary_mul: x must be 3-D or 4-D")
        d = x.shape[-1]
        _check(d % 2 == 0 and d < 896, f"D {d} must be even and < 896")
        _check(r1.shape == r2.shape and r1.shape[-1] == d, "r1 / r2: same shape, last dim D")
        _check(r1.dtype == r2.dtype == x.dtype, f"x, r1, r2 dtypes {x.dtype} {r1.dtype} {r2.dtype} must match")
        _check(float(r1.abs().max()) <= 1.0 + 1e-6 and float(r2.abs().max()) <= 1.0 + 1e-6,
               "cos / sin values must lie in [-1, 1]")
        if x.dim() == 4:
            d0, d1, d2 = x.shape[:3]
            ok = {(1, 1, d2), (d0, 1, d2), (1, d1, 1), (d0, d1, 1), (d0, 1, 1), (d0, d1, d2)} if rotary_mode == "half" \
                else {(1, 1, d2), (1, d1, 1), (d0, 1, 1)}
            _check(tuple(r1.shape[:3]) in ok, f"r1 {tuple(r1.shape)} is not a documented broadcast of x "
                                              f"{tuple(x.shape)} in {rotary_mode} mode (BNSD / BSND / SBND tables)")
        if rotary_mode == "half":
            x1, x2 = x.chunk(2, -1)
            rot = torch.cat([-x2, x1], -1)
        else:
            _check(rotary_mode == "interleave", f"rotary_mode {rotary_mode!r}")
            x1, x2 = x[..., 0::2], x[..., 1::2]
            rot = torch.stack([-x2, x1], -1).flatten(-2)
        return x * r1 + rot * r2

    if v >= (7, 0):
        def npu_rotary_mul(self, r1, r2, rotary_mode="half"):
            return _rotary(self, r1, r2, rotary_mode)
    else:
        def npu_rotary_mul(self, r1, r2):
            return _rotary(self, r1, r2, "half")
    ops["npu_rotary_mul"] = npu_rotary_mul

    def npu_swiglu(self, dim=-1):
        rec.record("npu_swiglu", self=self, dim=dim)
        _check(self.is_contiguous(), "npu_swiglu: non-contiguous input is not supported")
        _check(self.shape[dim] % 2 == 0, "npu_swiglu: the split dim must be even")
        a, b = self.chunk(2, dim)
        return F.silu(a) * b
    ops["npu_swiglu"] = npu_swiglu

    def _gmm(x, weight, bias, group_list, split_item, group_type, group_list_type):
        rec.record("npu_grouped_matmul", x=x, weight=weight, bias=bias, group_list=group_list,
                   split_item=split_item, group_type=group_type, group_list_type=group_list_type)
        _check(isinstance(x, list) and isinstance(weight, list) and len(x) == 1 and len(weight) == 1,
               "the fake models the single-x / single-weight forms")
        _check(bias is None, "bias is not modelled")
        xs, w = x[0], weight[0]
        _check(xs.dtype == w.dtype, f"x {xs.dtype} and weight {w.dtype} must match")
        _check(xs.shape[-1] < 65536 and w.shape[-1] < 65536, "last dims < 65536")
        if isinstance(group_list, torch.Tensor):
            _check(group_type is not None, "Requires manual passing group_type, current is None.")
            _check(group_list.dtype == torch.int64 and group_list.dim() == 1, "group_list: 1-D int64")
            gl = group_list.tolist()
        else:
            _check(group_type is None or v < (7, 0), "a List[int] group_list takes group_type None")
            gl = list(group_list)
            _check(len(gl) != 1, "a List[int] group_list must not be of length 1")
        _check(len(gl) <= 1024, "at most 1024 groups")
        _check(group_list_type in (0, 1), f"group_list_type {group_list_type}")
        counts = gl if group_list_type == 1 else [b - a for a, b in zip([0] + gl[:-1], gl)]
        _check(all(c >= 0 for c in counts), "group_list: non-negative and non-decreasing")
        with torch.no_grad():  # npu_grouped_matmul has no autograd (not in derivatives.yaml)
            if group_type in (0, -1, None):
                _check(split_item in (2, 3), "the fake models split_item 2 / 3 (one output tensor)")
                _check(w.dim() == 3 and w.shape[0] == len(counts), f"weight [E, K, N] with E = {len(counts)}")
                _check(sum(counts) == xs.shape[0], f"group sizes sum {sum(counts)} != M {xs.shape[0]}")
                out = xs.new_empty(xs.shape[0], w.shape[2])
                s = 0
                for g, c in enumerate(counts):
                    out[s:s + c] = xs[s:s + c] @ w[g]
                    s += c
                return [out]
            _check(group_type == 2 and split_item == 3, "K-grouping takes group_type 2, split_item 3")
            _check(w.dim() == 2 and sum(counts) == xs.shape[1] == w.shape[0], "K-grouping: x [K, M], weight [M, N]")
            out = xs.new_empty(len(counts), xs.shape[0], w.shape[1])  # uninitialised where a group is empty
            s = 0
            for g, c in enumerate(counts):
                if c:
                    out[g] = xs[:, s:s + c] @ w[s:s + c]
                s += c
            return [out]

    if v >= (7, 1):
        def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                               antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                               activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                               group_type=None, group_list_type=0, act_type=0, tuning_config=None,
                               output_dtype=None):
            return _gmm(x, weight, bias, group_list, split_item, group_type, group_list_type)
    elif v >= (7, 0):
        def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                               antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                               activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                               group_type=-1, group_list_type=0, act_type=0, output_dtype=None):
            return _gmm(x, weight, bias, group_list, split_item, group_type, group_list_type)
    else:
        def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                               antiquant_offset=None, group_list=None, split_item=0, output_dtype=None):
            return _gmm(x, weight, bias, group_list, split_item, None, 0)
    ops["npu_grouped_matmul"] = npu_grouped_matmul

    def permute(tokens, indices, num_out_tokens=None, padded_mode=False, name="npu_moe_token_permute", grad=True):
        rec.record(name, tokens=tokens, indices=indices, num_out_tokens=num_out_tokens, padded_mode=padded_mode)
        _check(tokens.dim() == 2, "tokens must be 2-D [num_tokens, H]")
        _check(indices.dim() in (1, 2) and indices.dtype in (torch.int32, torch.int64), "indices 1-D/2-D int32/64")
        _check(indices.numel() < 16777215 and (indices.dim() == 1 or indices.shape[1] <= 512), "size limits")
        _check(not padded_mode, "padded_mode is not supported")
        _check(num_out_tokens in (None, 0), "the fake models the dropless form")
        k = 1 if indices.dim() == 1 else indices.shape[1]
        flat = indices.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        rows = tokens.index_select(0, torch.div(order, k, rounding_mode="floor"))
        sorted_indices = torch.argsort(order, stable=True).to(torch.int32)  # the inverse map
        return (rows if grad else rows.detach()), sorted_indices

    def unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None,
                  name="npu_moe_token_unpermute", grad=True):
        rec.record(name, permuted_tokens=permuted_tokens, sorted_indices=sorted_indices, probs=probs)
        _check(permuted_tokens.dim() == 2 and sorted_indices.dim() == 1, "permuted 2-D, sorted_indices 1-D")
        _check(sorted_indices.dtype == torch.int32, "sorted_indices int32")
        _check(not padded_mode, "padded_mode is not supported")
        if probs is None:
            out = permuted_tokens.index_select(0, sorted_indices.long())
        else:
            _check(probs.dim() == 2 and probs.numel() == sorted_indices.numel(), "probs [num_tokens, topK]")
            _check(probs.dtype == permuted_tokens.dtype, f"probs {probs.dtype} vs tokens {permuted_tokens.dtype}")
            n, k = probs.shape
            y = permuted_tokens.index_select(0, sorted_indices.long()).view(n, k, -1)
            out = (probs.unsqueeze(-1) * y).sum(1)
        return out if grad else out.detach()

    if v >= (7, 1):
        grad = v >= (7, 2)  # forward-only in 7.1, autograd from 7.2 (the *_grad_v2 ops)
        ops["npu_moe_token_permute"] = lambda tokens, indices, num_out_tokens=None, padded_mode=False: permute(
            tokens, indices, num_out_tokens, padded_mode, grad=grad)
        ops["npu_moe_token_unpermute"] = lambda permuted_tokens, sorted_indices, probs=None, padded_mode=False, \
            restore_shape=None: unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape,
                                          grad=grad)
        if grad:
            ops["npu_moe_token_permute_grad_v2"] = lambda *a, **k: None
            ops["npu_moe_token_unpermute_grad_v2"] = lambda *a, **k: None

    if v >= (7, 0):
        def npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0,
                                 norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
            rec.record("npu_moe_gating_top_k", x=x, k=k, bias=bias, k_group=k_group, group_count=group_count,
                       group_select_mode=group_select_mode, renorm=renorm, norm_type=norm_type)
            _check(x.dim() == 2 and x.shape[1] <= 2048, "x 2-D with <= 2048 experts")
            e = x.shape[1]
            _check(bias is None or (bias.dim() == 1 and bias.shape[0] == e and bias.dtype == x.dtype),
                   "bias 1-D [E], x's dtype")
            _check(e % group_count == 0 and e // group_count > 2, "E / group_count > 2")
            _check(-(-(e // group_count) // 32) * 32 * group_count <= 2048, "align32(E/group_count) * group_count")
            _check(1 <= k <= e // group_count * k_group, "1 <= k <= E / group_count * k_group")
            _check(renorm == 0 and norm_type in (0, 1) and group_select_mode in (0, 1), "renorm 0, norm / mode")
            with torch.no_grad():  # no backward before 26.1
                s = torch.sigmoid(x.float()) if norm_type == 1 else torch.softmax(x.float(), -1)
                sb = s + bias.float() if bias is not None else s
                t = x.shape[0]
                if group_count > 1:
                    g = sb.view(t, group_count, e // group_count)
                    gs = g.topk(2, -1).values.sum(-1) if group_select_mode == 1 else g.max(-1).values
                    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(k_group, -1).indices, True)
                    keep = keep.unsqueeze(-1).expand(t, group_count, e // group_count).reshape(t, e)
                    sb = sb.masked_fill(~keep, float("-inf"))
                idx = sb.topk(k, -1).indices
                y = s.gather(1, idx)
                if norm_type == 1:
                    y = y / (y.sum(-1, keepdim=True) + eps)
                y = (y * routed_scaling_factor).to(x.dtype)
            return y, idx.to(torch.int32), s
        ops["npu_moe_gating_top_k"] = npu_moe_gating_top_k
    return ops, permute, unpermute


class _Profile:
    def __init__(self, rec, **kw):
        self.rec, self.kw = rec, kw
        rec.record("profiler.profile", **{k: v for k, v in kw.items() if k != "on_trace_ready"})

    def start(self):
        self.rec.record("profiler.start")

    def stop(self):
        self.rec.record("profiler.stop")
        if self.kw.get("on_trace_ready"):
            self.kw["on_trace_ready"](self)

    def step(self):
        self.rec.record("profiler.step")


def make_module(version: str = "7.2", device_count: int = 8, device_name: str = "Ascend910B3"):
    _check(version in VERSIONS, f"version {version} not in {VERSIONS}")
    rec = _Rec()
    mod = types.ModuleType("torch_npu")
    mod.__version__ = {"6.0": "2.4.0.post2", "7.0": "2.5.1", "7.1": "2.6.0", "7.2": "2.7.1",
                       "7.3": "2.8.0.post2"}[version]
    mod.fake_version = version
    ops, permute, unpermute = _make_ops(rec, version)
    for name, fn in ops.items():
        setattr(mod, name, fn)
    npu = types.ModuleType("torch_npu.npu")
    state = {"jit_compile": None, "deterministic_level": None}

    def set_compile_mode(jit_compile=False):
        rec.record("npu.set_compile_mode", jit_compile=jit_compile)
        state["jit_compile"] = jit_compile

    npu.set_compile_mode = set_compile_mode
    npu.is_jit_compile_false = lambda: state["jit_compile"] is False
    npu.set_deterministic_level = lambda level: state.update(deterministic_level=level)
    npu.device_count = lambda: device_count
    npu.get_device_name = lambda i=0: device_name
    npu.is_available = lambda: device_count > 0
    npu.set_device = lambda d: rec.record("npu.set_device", device=str(d))
    npu.synchronize = lambda *a: None
    npu.manual_seed_all = lambda seed: None  # torch.manual_seed calls these on the PrivateUse1 module
    npu._is_in_bad_fork = lambda: False
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(npu, stat, lambda *a: 0)
    npu.state = state
    prof = types.ModuleType("torch_npu.profiler")
    prof.ProfilerActivity = types.SimpleNamespace(CPU="CPU", NPU="NPU")
    prof.profile = lambda **kw: _Profile(rec, **kw)
    prof.tensorboard_trace_handler = lambda path: (lambda p: rec.record("profiler.trace", path=path))
    mod.npu, mod.profiler = npu, prof
    mod.calls = rec.calls
    mod.rec = rec
    mod._permute, mod._unpermute = permute, unpermute
    return mod


def make_mindspeed(rec: _Rec, permute, unpermute):
    """``mindspeed.ops.gmm`` (npu_gmm: cumulative int64 group_list, autograd) and the permute ops."""
    root = types.ModuleType("mindspeed")
    ops = types.ModuleType("mindspeed.ops")
    gmm = types.ModuleType("mindspeed.ops.gmm")

    def npu_gmm(x, weight, *, bias=None, group_list=None, group_type=0, gemm_fusion=False, original_weight=None):
        rec.record("mindspeed.npu_gmm", x=x, weight=weight, bias=bias, group_list=group_list, group_type=group_type,
                   gemm_fusion=gemm_fusion)
        _check(bias is None, "bias must be None for training")
        _check(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
               "group_list: 1-D int64 tensor")
        gl = group_list.tolist()
        _check(len(gl) != 1, "group_list must not be of length 1")
        _check(all(a <= b for a, b in zip(gl, gl[1:])) and gl[-1] == x.shape[0], "cumulative, ends at M")
        _check(group_type == 0 and weight.dim() == 3 and weight.shape[0] == len(gl), "group_type 0, weight [E,K,N]")
        outs, s = [], 0
        for g, e in enumerate(gl):
            outs.append(x[s:e] @ weight[g])
            s = e
        return torch.cat(outs, 0)  # differentiable: npu_gmm has autograd (GMMFunction)

    gmm.npu_gmm = npu_gmm
    p = types.ModuleType("mindspeed.ops.npu_moe_token_permute")
    p.npu_moe_token_permute = lambda tokens, indices, num_out_tokens=None, padded_mode=False: permute(
        tokens, indices, num_out_tokens, padded_mode, name="mindspeed.npu_moe_token_permute")
    u = types.ModuleType("mindspeed.ops.npu_moe_token_unpermute")
    u.npu_moe_token_unpermute = lambda permuted_tokens, sorted_indices, probs=None, padded_mode=False, \
        restore_shape=None: unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape,
                                      name="mindspeed.npu_moe_token_unpermute")
    root.ops, ops.gmm = ops, gmm
    ops.npu_moe_token_permute, ops.npu_moe_token_unpermute = p, u
    return {"mindspeed": root, "mindspeed.ops": ops, "mindspeed.ops.gmm": gmm,
            "mindspeed.ops.npu_moe_token_permute": p, "mindspeed.ops.npu_moe_token_unpermute": u}


@contextlib.contextmanager
def install(version: str = "7.2", mindspeed: bool = False, device_count: int = 8, device_name: str = "Ascend910B3"):
    """Put the fake in sys.modules (and ``torch.npu``) for the block; the kernel table is not touched (call
    ``kernels.configure(kind="npu")`` to bind it, ``kernels.configure()`` after the block)."""
    mod = make_module(version, device_count, device_name)
    if torch._C._get_privateuse1_backend_name() != "npu":
        # what importing torch_npu does: the PrivateUse1 device type is "npu" (once per process, as there)
        torch.utils.rename_privateuse1_backend("npu")
    mods = {"torch_npu": mod, "torch_npu.npu": mod.npu, "torch_npu.profiler": mod.profiler}
    if mindspeed:
        mods.update(make_mindspeed(mod.rec, mod._permute, mod._unpermute))
    saved = {k: sys.modules.get(k) for k in mods}
    had_npu = hasattr(torch, "npu")
    old_npu = getattr(torch, "npu", None)
    sys.modules.update(mods)
    torch.npu = mod.npu
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        # the PrivateUse1 rename cannot be undone, so torch keeps asking torch.npu whether an accelerator is there
        # (torch.optim's step does): leave a module that says no, as a machine with torch_npu and no device would
        torch.npu = old_npu if had_npu else _no_device_module()
        cache_clear = getattr(torch.get_device_module, "cache_clear", None)
        if cache_clear is not None:  # torch caches the device module it looked up while the fake was in place
            cache_clear()


def _no_device_module():
    m = types.ModuleType("torch.npu")
    m.is_available = lambda: False
    m.device_count = lambda: 0
    return m
