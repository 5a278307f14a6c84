"""Multi-head Latent Attention (deepseek_architecture.md 1.2), split over TP by heads.

    c_q  = q_a_layernorm(q_a_proj(x))           (V2-Lite form: no q latent, q = q_proj(x))
    c_kv, k_pe = split(kv_a_proj_with_mqa(x)); c_kv = kv_a_layernorm(c_kv)
    q = q_b_proj(c_q) -> [nope | rope] per head; k_nope, v = kv_b_proj(c_kv) per head
    q_pe, k_pe = RoPE (interleaved pairs); k_pe is one head shared by all heads
    o = softmax(q k^T * softmax_scale + mask) v;  out = o_proj(o)

Parallel layout: the down projections (q_a_proj, kv_a_proj_with_mqa) and the latent norms are replicated and
run on this rank's tokens; the latents ``[c_q | c_kv | k_pe]`` cross into the TP region in one collective
(all-gather along the sequence under SP, identity otherwise; the backward reduce-scatters / all-reduces the
per-head partial gradients); q_b_proj / kv_b_proj are column-parallel (heads), o_proj row-parallel.
Inputs ``x [s(/tp), b, h]`` -> output ``[s(/tp), b, h]``.

Core attention is the kernel table's ``attention`` (platform/kernels.py): torch_npu's npu_fusion_attention on
Ascend; torch's scaled_dot_product_attention with either ``is_causal`` or a boolean mask ``[b, 1, s, s]``
(packed segments, DSA top-k) where it has a kernel that keeps q, k, v for backward; else the reference here, an
explicit softmax(QK^T)V that keeps q, k, v themselves (torch's math fallback keeps scaled copies instead):
causal, it runs per query block over the keys up to the block's end (``causal_query_blocks``: the masked
upper triangle is skipped, ~1.7x faster fwd+bwd at s=512 on CPU, probabilities saved per block). Selective
recompute (``self.recompute_modules``, set by megatron_ascend.recompute): ``core_attn`` checkpoints core
attention; ``mla_up_proj`` runs q_b_proj / kv_b_proj + RoPE + concat as a checkpoint without output: q, k, v
are dropped once core attention has saved them and rebuilt from the latents when its backward needs them
(with ``core_attn`` also on, that checkpoint holds q, k, v as its inputs, so the pair saves what ``core_attn``
alone saves).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ModelConfig
from ...platform import kernels
from ...tensor_parallel import mappings as M
from ...tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, tp_info
from ...tensor_parallel.random import checkpoint, checkpoint_discard_output
from ...tensor_parallel.sharding import mark_sharded
from ...tensor_parallel import wgrad
from .norm import RMSNorm
from .rope import apply_rope_interleaved, inv_freq_and_attention_factor, softmax_scale

LATENT_NORM_EPS = 1e-6  # HF and the DeepSeek reference build q_a / kv_a norms with the default eps


def _replicated_linear(i: int, o: int, bias: bool, sequence_parallel: bool) -> nn.Linear:
    lin = wgrad.Linear(i, o, bias=bias)
    for p in lin.parameters():
        mark_sharded(p, None, sequence_parallel=sequence_parallel)
    return lin


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's minimum elsewhere (a finite bias: a row with no allowed key attends
    uniformly instead of giving NaN; an add keeps nothing for backward)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _explicit_attention(qt, kt, vt, mask, scale):
    """softmax(q k^T * scale, masked) v on [b, n, s, d] with a bool ``mask`` (packed segments, DSA top-k;
    the causal case takes ``_causal_block_attention``); autograd keeps q, k, v themselves (views) and the
    probabilities -- the memory of torch's math fallback, with q/k/v droppable."""
    w = torch.matmul(qt, kt.transpose(-1, -2)) * scale + _additive_mask(mask, qt.dtype)
    p = torch.softmax(w, dim=-1, dtype=_softmax_dtype(w.dtype)).to(vt.dtype)
    return torch.matmul(p, vt)


CAUSAL_BLOCK = 128  # query rows per block of the causal math path (a multiple of 64; see causal_query_blocks)


def causal_query_blocks(s: int) -> List[Tuple[int, int]]:
    """Query row blocks [start, end) of the causal math path: block i attends keys [0, end_i) only, so the
    masked upper triangle is skipped block-wise (the work and the saved probabilities are
    sum_i (end_i - start_i) * end_i instead of s^2: 5/8 of it for 4 blocks). At least CAUSAL_BLOCK rows per
    block (smaller GEMMs lose more to overhead than they save), at most 8 blocks."""
    c = max(CAUSAL_BLOCK, -(-s // 8 // 64) * 64)
    return [(i, min(i + c, s)) for i in range(0, s, c)]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision scores are normalised in fp32; fp32 / fp64 in their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_CAUSAL_BIAS: dict = {}


def _causal_bias(rows: int, cols: int, offset: int, dtype, device) -> torch.Tensor:
    """Additive mask [rows, cols] of query rows offset..offset+rows over keys 0..cols: 0 where key <= query,
    the dtype's minimum above the diagonal (cached: one per shape, built once)."""
    key = (rows, cols, offset, dtype, device)
    t = _CAUSAL_BIAS.get(key)
    if t is None:
        t = _additive_mask(torch.ones(rows, cols, dtype=torch.bool, device=device).tril(offset), dtype)
        if len(_CAUSAL_BIAS) > 256:
            _CAUSAL_BIAS.clear()
        _CAUSAL_BIAS[key] = t
    return t


class _CausalBlockAttention(torch.autograd.Function):
    """Causal softmax(q k^T * scale) v on [B, s, d] (B = batch x heads), exact, per query block
    (causal_query_blocks): block [a, e) takes keys [0, e); the scale and the block's causal mask are folded
    into one ``baddbmm``. Keeps q, k, v (the inputs themselves) and each block's probabilities (in the softmax
    dtype: fp32 for half inputs). The backward (torch's fused softmax backward per block) takes the last block
    first -- it covers every key, so its dk / dv GEMM outputs are the full-size grads -- and adds the earlier
    blocks' into their key prefixes: no zero-filled full-size grad per block as autograd would build."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        s = q.shape[1]
        blocks = causal_query_blocks(s)
        outs, probs = [], []
        for a, e in blocks:
            w = torch.baddbmm(_causal_bias(e - a, e, a, q.dtype, q.device), q[:, a:e], k[:, :e].transpose(1, 2),
                              alpha=scale)
            p = torch.softmax(w, dim=-1, dtype=_softmax_dtype(w.dtype))
            probs.append(p)
            outs.append(torch.bmm(p.to(v.dtype), v[:, :e]))
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale, ctx.blocks = scale, blocks
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, do):
        q, k, v, *probs = ctx.saved_tensors
        scale = ctx.scale
        dqs, dk, dv = [], None, None
        # last block first: it sees every key, so its dk / dv are the full-size tensors (no zero fill); an
        # earlier block's GEMM output is added into its key prefix (a GEMM written into a strided slice would
        # run batch by batch)
        for (a, e), p in reversed(list(zip(ctx.blocks, probs))):
            do_b = do[:, a:e]
            dv_b = torch.bmm(p.to(v.dtype).transpose(1, 2), do_b)
            dp = torch.bmm(do_b, v[:, :e].transpose(1, 2)).to(p.dtype)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype).to(q.dtype)
            dqs.append(torch.bmm(ds, k[:, :e]).mul_(scale))
            dk_b = torch.bmm(ds.transpose(1, 2), q[:, a:e]).mul_(scale)
            if dk is None:
                dk, dv = dk_b, dv_b
            else:
                dk[:, :e].add_(dk_b)
                dv[:, :e].add_(dv_b)
        dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs[::-1], dim=1)
        return dq, dk, dv, None


def _causal_block_attention(qt, kt, vt, scale):
    """Causal attention on [b, n, s, d] through ``_CausalBlockAttention``."""
    b, n, s, d = qt.shape
    # [b, n, s, d] permuted from [s, b, n, d]: merging b and n is a view, so q/k/v are not copied
    q3, k3, v3 = qt.reshape(b * n, s, d), kt.reshape(b * n, s, d), vt.reshape(b * n, s, vt.shape[-1])
    return _CausalBlockAttention.apply(q3, k3, v3, scale).view(b, n, s, -1)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   scale: float) -> torch.Tensor:
    """q, k: [s, b, n, dq]; v: [s, b, n, dv]; mask None (causal) or bool [b, 1, s, s] (True = attend).
    Returns [s, b, n*dv]: the kernel table's ``attention`` (torch_npu's npu_fusion_attention on Ascend, torch's
    SDPA where it has a kernel that keeps q, k, v, else ``math_attention`` below, the reference)."""
    return kernels.get("attention")(q, k, v, mask, scale)


@kernels.reference("attention")
def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   scale: float) -> torch.Tensor:
    """The reference of the table's ``attention``: explicit softmax(QK^T)V with the bool mask, or, causal, the
    query-block form (``_CausalBlockAttention``); both keep q, k, v themselves for backward."""
    qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
    o = _explicit_attention(qt, kt, vt, mask, scale) if mask is not None else \
        _causal_block_attention(qt, kt, vt, scale)
    s, b = q.shape[0], q.shape[1]
    return o.permute(2, 0, 1, 3).reshape(s, b, -1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Explicit softmax(q k^T * scale) over allowed keys, summed over this rank's heads: [b, s, s] (fp32)."""
    qt, kt = q.permute(1, 2, 0, 3).float(), k.permute(1, 2, 0, 3).float()
    w = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    w = w.masked_fill(~mask, float("-inf")).softmax(-1)
    return w.sum(1)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, groups=None, sequence_parallel: bool = False, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.group, _, tp = tp_info(groups)
        self.sp = sequence_parallel and tp > 1
        if c.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {c.num_attention_heads} is not divisible by tensor-parallel "
                             f"size {tp}; pick a TP size that divides it")
        self.n_local = c.num_attention_heads // tp
        self.q_lora_rank = c.q_lora_rank
        qk, H = c.qk_head_dim, c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(c.hidden_size, H * qk, groups, skip_input_comm=True)
        else:
            self.q_a_proj = _replicated_linear(c.hidden_size, c.q_lora_rank, c.attention_bias, self.sp)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, sequence_parallel=self.sp)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, H * qk, groups, skip_input_comm=True)
        self.kv_a_proj_with_mqa = _replicated_linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                                     c.attention_bias, self.sp)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, sequence_parallel=self.sp)
        self.kv_b_proj = ColumnParallelLinear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), groups,
                                              skip_input_comm=True)
        self.o_proj = RowParallelLinear(H * c.v_head_dim, c.hidden_size, groups, bias=c.attention_bias,
                                        sequence_parallel=self.sp)
        self.softmax_scale = softmax_scale(c)
        self.rope_factor = inv_freq_and_attention_factor(c)[1]  # YaRN factor inside cos / sin (kernel table)
        self.indexer = None
        if c.has_indexer:
            from .indexer import DSAIndexer
            if c.q_lora_rank is None:
                raise ValueError("the DSA indexer (index_topk > 0) reads the query latent; set q_lora_rank")
            self.indexer = DSAIndexer(c, groups, layer_idx)
        self.recompute_modules = frozenset()

    # -- pieces (separate so selective recompute can wrap them) --------------------------------------
    def _up_proj(self, q_in, c_kv, k_pe, cos, sin):
        c = self.config
        s, b = q_in.shape[0], q_in.shape[1]
        q = (self.q_proj(q_in) if self.q_lora_rank is None else self.q_b_proj(q_in))
        q = q.view(s, b, self.n_local, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(s, b, self.n_local, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q_pe = apply_rope_interleaved(q_pe, cos, sin, self.rope_factor)
        k_pe = apply_rope_interleaved(k_pe.unsqueeze(2), cos, sin, self.rope_factor).expand(
            s, b, self.n_local, c.qk_rope_head_dim)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        return q, k, v.contiguous()

    def _core(self, q, k, v, mask):
        return core_attention(q, k, v, mask, self.softmax_scale)

    def _run(self, name, fn, *args):
        if name in self.recompute_modules:
            return checkpoint(fn, *args)
        return fn(*args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]):
        """x [s(/tp), b, h]; cos/sin [s, b, 1, r/2] (full sequence); mask None or bool [b, 1, s, s].
        Returns (out [s(/tp), b, h], indexer KL loss (scalar tensor) or None)."""
        c = self.config
        if self.q_lora_rank is None:
            q_in = x
        else:
            q_in = self.q_a_layernorm(self.q_a_proj(x))
        ckv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = ckv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        widths = [q_in.shape[-1], c.kv_lora_rank, c.qk_rope_head_dim]
        latent = torch.cat([q_in, c_kv, k_pe], dim=-1)
        if self.sp:
            latent = M.gather_from_sequence_parallel_region(latent, self.group)
        else:
            latent = M.copy_to_tensor_model_parallel_region(latent, self.group)
        q_in_f, c_kv_f, k_pe_f = latent.split(widths, dim=-1)

        indexer_loss = None
        if self.indexer is not None:
            with torch.no_grad():
                x_full = M._gather_dim(x.detach(), 0, self.group) if self.sp else x.detach()
            allowed = _expand_mask(mask, x_full.shape[0], x_full.shape[1], x.device)
            index_scores, selected = self.indexer(x_full, q_in_f.detach(), cos, sin, allowed)
            mask = selected.unsqueeze(1)  # [b, 1, s, s]: causal/segment AND top-k
        probs = []

        def attend(q, k, v):
            o = self._run("core_attn", self._core, q, k, v, mask)
            if self.indexer is not None and torch.is_grad_enabled():
                with torch.no_grad():
                    p = attention_probs(q.detach(), k.detach(), mask, self.softmax_scale)
                    probs.append(M._all_reduce(p, self.group))
            return o

        if "mla_up_proj" in self.recompute_modules and torch.is_grad_enabled():
            # Megatron's up-projection recompute: q, k, v are not kept for core attention's backward, they are
            # rebuilt (once) from the latents, which q_b_proj / kv_b_proj keep anyway
            o = checkpoint_discard_output(self._up_proj, (q_in_f, c_kv_f, k_pe_f, cos, sin), attend,
                                          checkpoint_fn=False)
        else:
            o = attend(*self._up_proj(q_in_f, c_kv_f, k_pe_f, cos, sin))
        if probs:
            indexer_loss = self.indexer.kl_loss(probs[0], index_scores, selected)
        return self.o_proj(o), indexer_loss


def _expand_mask(mask: Optional[torch.Tensor], s: int, b: int, device) -> torch.Tensor:
    """Allowed keys as bool [b, s, s] (causal when ``mask`` is None)."""
    if mask is None:
        return torch.ones(s, s, dtype=torch.bool, device=device).tril().expand(b, s, s)
    return mask[:, 0]
