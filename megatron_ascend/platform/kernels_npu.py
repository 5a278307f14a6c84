"""Ascend implementations of the kernel table: torch_npu operators, and MindSpeed's where they are the better
(or the only) choice and ``mindspeed`` imports. Written from ../shared/reference/ascend_npu.md (section numbers
below: the op-plugin schemas, the official torch_npu docs and MindSpeed's code); exercised on CPU by
tests/test_kernels_npu.py with a fake torch_npu that checks every argument against those documents and then
computes what the documents say; not yet run on an NPU (docs/ASCEND.md).

Each binding keeps the table's contract (kernels.py) and declines -- falls back to the reference, reason kept --
on what the operator does not take. Positional first arguments where the schema calls them ``self`` (§0).

* rms_norm       ``torch_npu.npu_rms_norm(x, gamma, epsilon=eps)[0]`` (§2.1): x of 2-8 dims, (x, gamma) dtype
                 pairs of A2 / A3; output = x * rstd * gamma computed by the kernel (the reference casts to x's
                 dtype before the weight: equal in fp32, within bf16 rounding otherwise).
* rope_interleaved  ``torch_npu.npu_rotary_mul`` in its half mode on [x_even | x_odd] (§3.1, the SBND + SB1D
                 pairing), the pairs laid back afterwards -- exact in fp32, the layout trick MindSpeed uses for MLA
                 (§3.3); declines YaRN tables scaled above 1 (the kernel takes |cos|, |sin| <= 1), D >= 896, B or
                 N >= 1000.
* attention      ``torch_npu.npu_fusion_attention`` (§1): causal = BSND with the compressed 2048 x 2048 mask,
                 sparse_mode 2; packed sequences (a kernels.packed_mask) = TND varlen, sparse_mode 3, the
                 cumulative segment ends as actual_seq_qlen / kvlen (no leading 0); any other bool mask (DSA
                 top-k) = BSND with its complement as atten_mask (True = masked), sparse_mode 0. scale passed
                 explicitly (its default is 1.0), keep_prob 1.0. MLA's qk 192 / v 128 needs no padding in BSND /
                 TND. Declines D > 768, Dv > Dq, N > 256, dtypes other than fp16 / bf16 / fp32.
* sliding_attention  V4's sliding-window layers: ``npu_fusion_attention`` BSND with the one key/value head as
                 Nkv = 1, the band sparse_mode 4 with pre_tockens = window - 1, next_tockens = 0 (keys
                 t - window < j <= t) and the per-head ``sink`` (TorchNPU >= 7.3, §1.1); not bound before 7.3.
                 The sink's definition (an extra logit per head taking probability mass) is read from the
                 argument's name and shape [head_num] fp32 -- the least verified binding here.
* swiglu         ``torch_npu.npu_swiglu(cat([gate, up], -1), dim=-1)`` (§4: the first half is the gate); declines
                 V4's clamp. (Our gate and up come from two projections, so the concatenation is a copy.)
* grouped_matmul MindSpeed ``gmm.npu_gmm`` (cumulative group_list, its own autograd; §5.3, the path of
                 MindSpeed-LLM's DeepSeek-V3) when mindspeed imports, else ``torch_npu.npu_grouped_matmul`` with a
                 counts group_list (group_list_type 1, group_type 0) wrapped in an autograd function: dX by the
                 same op on W, dW by its K-grouped form (group_type 2, split_item 3) (§5.1-5.2; needs TorchNPU >=
                 7.0: group_type). The weight gradient goes back through autograd (the DDP hook adds it to
                 main_grad): MindSpeed's gemm_fusion into main_grad is not used.
* moe_permute    ``torch_npu.npu_moe_token_permute`` / ``npu_moe_token_unpermute`` (§6.1, with autograd from
                 TorchNPU 7.2) else MindSpeed's ops of the same contract; ``sorted_indices`` is the inverse map.
* router_topk    ``torch_npu.npu_moe_gating_top_k`` (§6.3) for the selection only (no gradient flows through
                 expert indices; the routing weights stay differentiable in PyTorch): sigmoid / softmax scores,
                 noaux_tc (top-2 group sums, bias) / group-limited greedy (group max) / greedy; declines
                 sqrt-softplus, > 2048 experts, groups of <= 2 experts.
"""
from __future__ import annotations

import importlib
import inspect
from typing import List, Optional

import torch

from . import kernels, npu
from .device import host_ints_to_device

KINDS = ("npu",)
_RMS_DTYPES = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}
_FA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASKS = {}


def _has_arg(fn, name: str, op: Optional[str] = None) -> bool:
    """Whether the operator takes ``name`` (a version check: arguments were appended release by release)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        pass
    try:
        schema = getattr(torch.ops.npu, op or fn.__name__).default._schema
        return any(a.name == name for a in schema.arguments)
    except Exception:
        return False


def _has_op(torch_npu, name: str) -> bool:
    if hasattr(torch_npu, name):
        return True
    try:
        getattr(torch.ops.npu, name)
        return True
    except Exception:
        return False


def _mindspeed(module: str):
    try:
        return importlib.import_module(module)
    except Exception:
        return None


def causal_mask(device) -> torch.Tensor:
    """The compressed lower-triangular-keep mask sparse_modes 2 / 3 / 4 take: [2048, 2048] bool, True above the
    diagonal (masked) -- MindSpeed's generate_attention_mask(compress=True) (§1.2)."""
    key = str(device)
    if key not in _MASKS:
        _MASKS[key] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
    return _MASKS[key]


# -- bindings -------------------------------------------------------------------------------------------------
def _bind_rms_norm(torch_npu):
    op = torch_npu.npu_rms_norm

    def rms_norm(x, weight, eps):
        if not 2 <= x.dim() <= 8 or (x.dtype, weight.dtype) not in _RMS_DTYPES:
            return kernels.fallback("rms_norm", f"npu_rms_norm takes 2-8 dims and the A2/A3 dtype pairs, not "
                                                f"{x.dim()}-D {x.dtype} x {weight.dtype}")(x, weight, eps)
        return op(x, weight, epsilon=eps)[0]
    return rms_norm


def _bind_rope(torch_npu):
    op = torch_npu.npu_rotary_mul

    def rope_interleaved(x, cos, sin, attention_factor=1.0):
        ref = None
        if attention_factor > 1.0:
            ref = f"YaRN attention factor {attention_factor:.4g} scales cos/sin above 1 (npu_rotary_mul: |cos| <= 1)"
        elif x.dim() != 4 or x.shape[-1] % 2 or x.shape[-1] >= 896 or x.shape[1] >= 1000 or x.shape[2] >= 1000:
            ref = f"npu_rotary_mul takes 4-D x with even D < 896 and B, N < 1000, not {tuple(x.shape)}"
        if ref:
            return kernels.fallback("rope_interleaved", ref)(x, cos, sin, attention_factor)
        xf = x.float()
        xd = torch.cat([xf[..., 0::2], xf[..., 1::2]], dim=-1)  # pairs -> halves: [x_even | x_odd]
        c = torch.cat([cos, cos], dim=-1).float()                # [s, b, 1, d]: SB1D for SBND x
        s = torch.cat([sin, sin], dim=-1).float()
        y = op(xd, c, s)  # half mode: [x_e cos - x_o sin | x_o cos + x_e sin]
        return torch.stack(y.chunk(2, dim=-1), dim=-1).flatten(-2).to(x.dtype)  # halves -> pairs
    return rope_interleaved


def _bind_attention(torch_npu):
    op = torch_npu.npu_fusion_attention

    def attention(q, k, v, mask, scale):
        s, b, n, dq = q.shape
        dv = v.shape[-1]
        why = None
        if q.dtype not in _FA_DTYPES or not (q.dtype == k.dtype == v.dtype):
            why = f"npu_fusion_attention takes fp16 / bf16 / fp32 q, k, v of one dtype, not {q.dtype}"
        elif dq > 768 or dv > dq or n > 256 or k.shape != q.shape:
            why = f"npu_fusion_attention needs D <= 768, Dv <= Dq, N <= 256 (got Dq {dq}, Dv {dv}, N {n})"
        if why:
            return kernels.fallback("attention", why)(q, k, v, mask, scale)
        packed = kernels.packed_segments(mask)
        if packed is not None and len(packed.cumulative_ends()) <= 2048:
            ends = packed.cumulative_ends()
            t = b * s
            qt, kt, vt = (x.transpose(0, 1).reshape(t, n, x.shape[-1]) for x in (q, k, v))  # (b s) n d
            o = op(qt, kt, vt, n, "TND", atten_mask=causal_mask(q.device), scale=scale, keep_prob=1.0,
                   actual_seq_qlen=ends, actual_seq_kvlen=ends, sparse_mode=3)[0]
            return o.view(b, s, n, dv).transpose(0, 1).reshape(s, b, n * dv)
        qb, kb, vb = (x.transpose(0, 1).contiguous() for x in (q, k, v))  # [b, s, n, d]
        if mask is None:
            o = op(qb, kb, vb, n, "BSND", atten_mask=causal_mask(q.device), scale=scale, keep_prob=1.0,
                   sparse_mode=2)[0]
        else:
            o = op(qb, kb, vb, n, "BSND", atten_mask=~mask, scale=scale, keep_prob=1.0, sparse_mode=0)[0]
        return o.transpose(0, 1).reshape(s, b, n * dv)
    return attention


def _bind_sliding(torch_npu):
    op = torch_npu.npu_fusion_attention

    def sliding_attention(q, kv, sinks, scale, window, block=None):
        b, s, h, d = q.shape
        if q.dtype not in _FA_DTYPES or kv.dtype != q.dtype or d > 768 or h > 256:
            return kernels.fallback("sliding_attention", f"npu_fusion_attention takes fp16 / bf16 / fp32, D <= 768, "
                                                         f"N <= 256 (got {q.dtype}, D {d}, N {h})")(
                q, kv, sinks, scale, window, block)
        k = kv.unsqueeze(2)  # [b, s, 1, D]: the one shared key / value head (Nq % Nkv == 0)
        return op(q.contiguous(), k, k, h, "BSND", atten_mask=causal_mask(q.device), scale=float(scale),
                  keep_prob=1.0, pre_tockens=int(window) - 1, next_tockens=0, sparse_mode=4,
                  sink=sinks.float())[0]
    return sliding_attention


def _bind_swiglu(torch_npu):
    op = torch_npu.npu_swiglu

    def swiglu(gate, up, limit=0.0):
        if limit and limit > 0:
            return kernels.fallback("swiglu", "npu_swiglu has no clamp (swiglu_limit)")(gate, up, limit)
        return op(torch.cat([gate, up], dim=-1), dim=-1)
    return swiglu


def _grouped_ok(x, weight) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        return f"the NPU grouped GEMM takes fp16 / bf16 / fp32 x and weight of one dtype, not {x.dtype} x {weight.dtype}"
    if weight.shape[0] > 1024 or x.shape[-1] >= 65536 or weight.shape[1] >= 65536:
        return f"the NPU grouped GEMM takes <= 1024 groups and last dims < 65536 (got {tuple(weight.shape)})"
    return None


def _bind_gmm_mindspeed(gmm):
    def grouped_matmul(x, weight, counts: List[int]):
        why = _grouped_ok(x, weight)
        if why:
            return kernels.fallback("grouped_matmul", why)(x, weight, counts)
        if len(counts) == 1:  # npu_gmm refuses a group list of length 1: one group is one GEMM
            return x @ weight[0].t()
        cum = host_ints_to_device(counts, torch.int64, x.device).cumsum(0)
        return gmm.npu_gmm(x, weight.transpose(1, 2), bias=None, group_list=cum, group_type=0)
    return grouped_matmul


class _NpuGroupedMatmul(torch.autograd.Function):
    """y = x_g W[g]^T by ``npu_grouped_matmul`` (forward-only op, §5.2): forward and dX M-grouped (split_item 2,
    group_type 0), dW K-grouped (split_item 3, group_type 2) -> [G, in, out], groups of zero rows set to 0."""

    @staticmethod
    def forward(ctx, x, weight, gl, counts, op):
        ctx.save_for_backward(x, weight, gl)
        ctx.counts, ctx.op = counts, op
        return op([x], [weight.transpose(1, 2)], bias=None, group_list=gl, split_item=2, group_type=0,
                  group_list_type=1)[0]

    @staticmethod
    def backward(ctx, dy):
        x, weight, gl = ctx.saved_tensors
        op = ctx.op
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = op([dy], [weight], bias=None, group_list=gl, split_item=2, group_type=0, group_list_type=1)[0]
        if ctx.needs_input_grad[1]:
            dwt = op([x.t()], [dy], bias=None, group_list=gl, split_item=3, group_type=2, group_list_type=1)[0]
            for g, c in enumerate(ctx.counts):
                if not c:
                    dwt[g].zero_()
            dw = dwt.transpose(1, 2)
        return dx, dw, None, None, None


def _bind_grouped_matmul(torch_npu):
    op = torch_npu.npu_grouped_matmul

    def grouped_matmul(x, weight, counts: List[int]):
        why = _grouped_ok(x, weight)
        if why:
            return kernels.fallback("grouped_matmul", why)(x, weight, counts)
        gl = host_ints_to_device(counts, torch.int64, x.device)
        return _NpuGroupedMatmul.apply(x, weight, gl, list(counts), op)
    return grouped_matmul


class _NpuUnpermute:
    def __init__(self, op, sorted_indices):
        self.op, self.sorted_indices = op, sorted_indices

    def __call__(self, y, probs):
        dtype = torch.promote_types(y.dtype, probs.dtype)  # the reference's precision (MindSpeed upcasts too)
        return self.op(y.to(dtype), self.sorted_indices, probs=probs.to(dtype))


def _bind_permute(permute_op, unpermute_op, name: str):
    def moe_permute(x, idx):
        n, k = idx.shape
        if idx.numel() >= 16777215 or k > 512 or x.dim() != 2:
            return kernels.fallback("moe_permute", f"{name} takes < 16777215 assignments, top-k <= 512")(x, idx)
        rows, sorted_indices = permute_op(x, idx.to(torch.int32))
        return rows, _NpuUnpermute(unpermute_op, sorted_indices)
    return moe_permute


def _bind_router_topk(torch_npu):
    op = torch_npu.npu_moe_gating_top_k

    def router_topk(logits, scores, topk, method, n_group, topk_group, bias, scoring):
        t, e = logits.shape
        groups = n_group if method != "greedy" and n_group > 1 else 1
        kg = topk_group if groups > 1 else 1
        why = None
        if scoring not in ("sigmoid", "softmax"):
            why = f"npu_moe_gating_top_k scores with sigmoid or softmax, not {scoring}"
        elif e > 2048 or e // groups <= 2 or -(-(e // groups) // 32) * 32 * groups > 2048 or \
                not 1 <= topk <= e // groups * kg:
            why = f"npu_moe_gating_top_k limits (E {e} <= 2048, E/groups > 2, k {topk} <= E/groups*k_group)"
        if why:
            return kernels.fallback("router_topk", why)(logits, scores, topk, method, n_group, topk_group, bias,
                                                         scoring)
        b = None if bias is None else bias.to(logits.dtype)
        _, idx, _ = op(logits, topk, bias=b, k_group=kg, group_count=groups,
                       group_select_mode=1 if method == "noaux_tc" else 0, renorm=0,
                       norm_type=1 if scoring == "sigmoid" else 0, out_flag=False)
        return idx.long()
    return router_topk


def register() -> List[str]:
    """Bind what this torch_npu (and mindspeed) offers; returns the implementation names registered."""
    kernels.unregister("torch_npu.")
    kernels.unregister("mindspeed.")
    torch_npu = npu.torch_npu_module()
    if torch_npu is None:
        return []
    done = []

    def add(entry, fn, impl):
        kernels.register_fused(entry, fn, impl, kinds=KINDS, first=True)
        done.append(impl)

    if hasattr(torch_npu, "npu_rms_norm"):
        add("rms_norm", _bind_rms_norm(torch_npu), "torch_npu.npu_rms_norm")
    if hasattr(torch_npu, "npu_rotary_mul"):
        add("rope_interleaved", _bind_rope(torch_npu), "torch_npu.npu_rotary_mul")
    if hasattr(torch_npu, "npu_fusion_attention"):
        add("attention", _bind_attention(torch_npu), "torch_npu.npu_fusion_attention")
    if hasattr(torch_npu, "npu_fusion_attention") and _has_arg(torch_npu.npu_fusion_attention, "sink"):
        add("sliding_attention", _bind_sliding(torch_npu), "torch_npu.npu_fusion_attention(sink)")
    if hasattr(torch_npu, "npu_swiglu"):
        add("swiglu", _bind_swiglu(torch_npu), "torch_npu.npu_swiglu")
    gmm = _mindspeed("mindspeed.ops.gmm")
    if gmm is not None and hasattr(gmm, "npu_gmm"):
        add("grouped_matmul", _bind_gmm_mindspeed(gmm), "mindspeed.ops.gmm.npu_gmm")
    elif hasattr(torch_npu, "npu_grouped_matmul") and _has_arg(torch_npu.npu_grouped_matmul, "group_type"):
        add("grouped_matmul", _bind_grouped_matmul(torch_npu), "torch_npu.npu_grouped_matmul")
    if hasattr(torch_npu, "npu_moe_token_permute") and _has_op(torch_npu, "npu_moe_token_permute_grad_v2"):
        add("moe_permute", _bind_permute(torch_npu.npu_moe_token_permute, torch_npu.npu_moe_token_unpermute,
                                         "npu_moe_token_permute"), "torch_npu.npu_moe_token_permute")
    else:
        p = _mindspeed("mindspeed.ops.npu_moe_token_permute")
        u = _mindspeed("mindspeed.ops.npu_moe_token_unpermute")
        if p is not None and u is not None:
            add("moe_permute", _bind_permute(p.npu_moe_token_permute, u.npu_moe_token_unpermute,
                                             "mindspeed npu_moe_token_permute"),
                "mindspeed.ops.npu_moe_token_permute")
    if hasattr(torch_npu, "npu_moe_gating_top_k"):
        add("router_topk", _bind_router_topk(torch_npu), "torch_npu.npu_moe_gating_top_k")
    return done
