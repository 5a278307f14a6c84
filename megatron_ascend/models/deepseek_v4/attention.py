"""DeepSeek-V4 attention (deepseek_architecture.md 6.3), split over TP by heads.

    c_q = q_a_norm(q_a_proj(x));  q = q_b_proj(c_q) -> [H, D] per token, unweighted RMSNorm per head
    kv  = kv_norm(kv_proj(x))     -> ONE head of D channels, read as key and as value by every head
    RoPE (interleaved, last qk_rope_head_dim channels) on q and kv: "main" table on sliding layers, "compress"
        (compress_rope_theta + YaRN) on CSA / HCA layers
    keys: the causal sliding window of ``sliding_window`` tokens (incl. itself) + compressed entries
        CSA (the CSA ratio, 4): the indexer's top-k of the entries visible to the query; HCA (any other): all of them
    o = softmax(q k^T / sqrt(D) with a per-head sink logit) @ kv;  o[..., rope] rotated back (inverse RoPE)
    out = o_b_proj(o_a_proj(o grouped in o_groups))     (o_a_proj: one [o_lora_rank, H*D/G] block per group)

``DeepseekV4Attention(config, parallel, groups, layer_idx)``; ``forward(x [s(/tp), b, h] (normed), rope,
position_ids [b, s]) -> (out [s(/tp), b, h], indexer KL loss (scalar) or None)``; ``rope`` is the dict of
``V4Rope(config)(position_ids, device)`` (or the V4Rope itself). The loss is returned when
``dsa_indexer_loss_coeff > 0`` and grad is enabled on a CSA layer; the layer attaches it (as for V3.2).

Parallel layout: q_a_proj, q_a_norm, kv_proj, kv_norm and the compressor's projections are replicated and run
on this rank's tokens; their outputs ``[c_q | kv | values | gates]`` enter the TP region in one collective
(all-gather along the sequence under SP, identity otherwise; the backward reduce-scatters / all-reduces the
per-head partial grads); q_b_proj is column-parallel (heads), the sinks are split by head, o_a_proj by group
(``o_groups % tp == 0``: whole groups per rank), o_b_proj is row-parallel. The compressor's pooling
(position_bias, kv_norm) runs on the full sequence on every rank and feeds only this rank's heads: those two
get partial grads, marked ``sequence_parallel`` whenever tp > 1 so the TP all-reduce completes them (as for
the MoE router). The indexer takes detached inputs (indexer.py).

Selective recompute (``self.recompute_modules``, set by megatron_ascend.recompute): ``core_attn`` checkpoints
the core attention (core_attention.py); ``mla_up_proj`` (Megatron's name for the up-projection) runs q_b_proj
+ per-head norm + RoPE as a checkpoint without output, itself checkpointed: q and q_b_proj's output ([H, D]
per token each, the largest tensors) are not kept; they are rebuilt from c_q in backward (q_b_proj runs twice
more: once for core attention's backward, once for its own).

Where transformers and DeepSeek's inference code differ we follow transformers (docs/V4.md, "Attention").
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ...config import ConfigError, ModelConfig, ParallelConfig
from ...tensor_parallel import mappings as M
from ...tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, tp_info
from ...tensor_parallel.random import checkpoint, checkpoint_discard_output
from ...tensor_parallel.sharding import init_normal_, mark_sharded
from ..deepseek.norm import RMSNorm
from .compressor import Compressor, replicated_linear, visible_entries
from .core_attention import QUERY_BLOCK, sink_window_attention
from .indexer import V4Indexer
from .rope import V4Rope, apply_partial_rope, compress_ratio, rope_kind

CSA_RATIO = 4  # DeepSeek's rule: ratio 4 overlaps and has the indexer; any other ratio is HCA
LAYER_TYPES = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention"}


def layer_type(config: ModelConfig, layer_idx: int) -> str:
    """sliding_attention / compressed_sparse_attention / heavily_compressed_attention (transformers' names). The
    config's own rule (``ModelConfig.attention_type``, CSA iff ratio == ``csa_compress_ratio``) where it has
    one, else DeepSeek's (CSA iff ratio == 4)."""
    rule = getattr(config, "attention_type", None)
    if rule is not None:
        return rule(layer_idx)
    return LAYER_TYPES.get(compress_ratio(config, layer_idx), "heavily_compressed_attention")


def check_config(config: ModelConfig, tp: int) -> None:
    """The V4 attention rules (one ConfigError each)."""
    c = config
    for name in ("head_dim", "sliding_window", "o_groups", "o_lora_rank"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} is {getattr(c, name)}; DeepSeek-V4 attention needs it > 0")
    if not c.q_lora_rank:
        raise ConfigError("DeepSeek-V4 attention needs q_lora_rank > 0 (the query LoRA)")
    if c.num_attention_heads % tp:
        raise ConfigError(f"num_attention_heads {c.num_attention_heads} is not divisible by "
                          f"tensor-model-parallel-size {tp}; pick a TP size that divides it")
    if c.num_attention_heads % c.o_groups:
        raise ConfigError(f"o_groups {c.o_groups} does not divide num_attention_heads {c.num_attention_heads}")
    if c.o_groups % tp:
        raise ConfigError(f"o_groups {c.o_groups} is not divisible by tensor-model-parallel-size {tp}: each rank "
                          f"must hold whole output groups; pick a TP size that divides {c.o_groups}")
    if c.qk_rope_head_dim % 2 or c.qk_rope_head_dim > c.head_dim:
        raise ConfigError(f"qk_rope_head_dim {c.qk_rope_head_dim} must be even and at most head_dim {c.head_dim}")
    bad = [r for r in c.compress_ratios if r < 0 or r == 1]
    if bad:
        raise ConfigError(f"compress_ratios has {bad}; use 0 (sliding only) or a ratio >= 2 (4: CSA, others: HCA)")
    if any(layer_type(c, i) == "compressed_sparse_attention" for i in range(len(c.compress_ratios))):
        if c.index_topk <= 0 or c.index_n_heads <= 0 or c.index_head_dim <= 0:
            raise ConfigError("compressed sparse attention (CSA) layers need index_topk, index_n_heads and "
                              "index_head_dim > 0")
        if c.index_n_heads % tp:
            raise ConfigError(f"index_n_heads {c.index_n_heads} is not divisible by tensor-model-parallel-size {tp}")
        if c.index_head_dim < c.qk_rope_head_dim:
            raise ConfigError(f"index_head_dim {c.index_head_dim} must be >= qk_rope_head_dim {c.qk_rope_head_dim}")


class _HeadRMSNorm(torch.autograd.Function):
    """Unweighted RMSNorm over the last dim (the per-head query norm): y = x * rsqrt(mean(x^2) + eps), computed
    in fp32. Keeps x (in its own dtype) and the fp32 rstd only -- the autograd form would also keep an fp32
    copy of x for half inputs ([H, D] per token)."""

    @staticmethod
    def forward(ctx, x, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        y = x.float() * rstd
        gf = g.float()
        return (rstd * (gf - y * (gf * y).mean(-1, keepdim=True))).to(x.dtype), None


class GroupedLinear(nn.Module):
    """o_a_proj: ``weight [G * R, in]`` (transformers' layout), group g maps its ``in`` inputs with rows
    ``[g R, (g+1) R)``. Split over TP by groups (dim 0)."""

    def __init__(self, in_per_group: int, rank: int, groups_total: int, groups=None):
        super().__init__()
        _, r, tp = tp_info(groups)
        self.n_local, self.rank = groups_total // tp, rank
        self.weight = nn.Parameter(torch.empty(self.n_local * rank, in_per_group))
        mark_sharded(self.weight, {0: ("tp", r, tp)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, G_local, in] -> [G_local, N, R]."""
        w = self.weight.view(self.n_local, self.rank, -1)
        return torch.bmm(x.transpose(0, 1), w.transpose(1, 2))


class CSACompressor(Compressor):
    """The CSA compressor (overlapping windows) with the lightning indexer inside, as transformers nests it."""

    def __init__(self, config: ModelConfig, groups, ratio: int, sequence_parallel: bool, partial_grads: bool):
        super().__init__(config.hidden_size, config.head_dim, ratio, True, config.rms_norm_eps,
                         sequence_parallel, partial_grads)
        self.indexer = V4Indexer(config, groups, ratio)


class DeepseekV4Attention(nn.Module):
    supports_recompute = ("core_attn", "mla_up_proj")  # selective modules it acts on (megatron_ascend.recompute)

    def __init__(self, config: ModelConfig, parallel: Optional[ParallelConfig] = None, groups=None,
                 layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.group, tp_rank, tp = tp_info(groups)
        check_config(c, tp)
        self.sp = bool(parallel is not None and parallel.sequence_parallel) and tp > 1
        self.kind = layer_type(c, layer_idx)
        self.ratio = compress_ratio(c, layer_idx)
        self.rope_kind = rope_kind(c, layer_idx)
        H, D = c.num_attention_heads, c.head_dim
        self.n_local, self.head_dim = H // tp, D
        self.window = c.sliding_window
        self.scale = D ** -0.5
        self.eps = c.rms_norm_eps
        self.q_a_proj = replicated_linear(c.hidden_size, c.q_lora_rank, self.sp)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, sequence_parallel=self.sp)
        self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, H * D, groups, skip_input_comm=True)
        self.kv_proj = replicated_linear(c.hidden_size, D, self.sp)
        self.kv_norm = RMSNorm(D, c.rms_norm_eps, sequence_parallel=self.sp)
        self.o_a_proj = GroupedLinear(H * D // c.o_groups, c.o_lora_rank, c.o_groups, groups)
        self.o_b_proj = RowParallelLinear(c.o_groups * c.o_lora_rank, c.hidden_size, groups,
                                          sequence_parallel=self.sp)
        self.sinks = nn.Parameter(torch.zeros(self.n_local, dtype=torch.float32))
        mark_sharded(self.sinks, {0: ("tp", tp_rank, tp)})
        self.compressor = None
        if self.kind == "compressed_sparse_attention":
            self.compressor = CSACompressor(c, groups, self.ratio, self.sp, tp > 1)
        elif self.kind == "heavily_compressed_attention":
            self.compressor = Compressor(c.hidden_size, D, self.ratio, False, c.rms_norm_eps, self.sp, tp > 1)
        self._rope = V4Rope(c)  # tables of the compressed entries' positions (not parameters)
        self.query_block = QUERY_BLOCK
        self.indexer_loss_coeff = c.dsa_indexer_loss_coeff
        self.recompute_modules = frozenset()

    # -- initialisation (transformers: sinks and position biases 0, norms 1, the rest N(0, std)) ---------------
    @torch.no_grad()
    def init_weights(self, prefix: str, std: float, seed: int) -> None:
        """Draw every parameter by its global name ``prefix + local name`` (layout independent)."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias"):
                p.zero_()
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                init_normal_(p, prefix + name, std, seed)

    # -- pieces (separate so selective recompute can wrap them) ------------------------------------------------
    def _up_proj(self, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """c_q [b, s, q_lora] -> q [b, s, H/tp, D]: q_b_proj, unweighted per-head RMSNorm, RoPE."""
        b, s = c_q.shape[0], c_q.shape[1]
        q = self.q_b_proj(c_q).view(b, s, self.n_local, self.head_dim)
        q = _HeadRMSNorm.apply(q, self.eps)
        return apply_partial_rope(q, cos, sin)

    def _core(self, q, kv, comp, sel, sinks, want_mass):
        return sink_window_attention(q, kv, comp, sel, sinks, self.scale, self.window, self.query_block,
                                     want_mass)

    def forward(self, x: torch.Tensor, rope, position_ids: torch.Tensor
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not isinstance(rope, dict):
            rope = rope(position_ids, x.device)
        cos, sin = rope[self.rope_kind]                    # [s, b, 1, r/2]
        cos_b, sin_b = cos.transpose(0, 1), sin.transpose(0, 1)  # [b, s, 1, r/2] views
        comp_mod = self.compressor

        # replicated projections on this rank's tokens, then one collective into the TP region
        c_q = self.q_a_norm(self.q_a_proj(x))
        kv = self.kv_norm(self.kv_proj(x))
        parts = [c_q, kv]
        if comp_mod is not None:
            parts.extend(comp_mod.project(x))
        widths = [t.shape[-1] for t in parts]
        latent = torch.cat(parts, dim=-1)
        if self.sp:
            latent = M.gather_from_sequence_parallel_region(latent, self.group)
        else:
            latent = M.copy_to_tensor_model_parallel_region(latent, self.group)
        full = latent.split(widths, dim=-1)
        c_q_f, kv_f = full[0], full[1]
        s, b = latent.shape[0], latent.shape[1]

        kv_b = apply_partial_rope(kv_f.transpose(0, 1).unsqueeze(2), cos_b, sin_b).squeeze(2)  # [b, s, D]
        comp, allowed, index, sel = None, None, None, None
        want_mass = False
        if comp_mod is not None:
            comp = comp_mod.pool(full[2], full[3], lambda pos: self._rope.at("compress", pos))  # [b, n, D]
            allowed = visible_entries(position_ids, comp.shape[1], self.ratio)
            if self.kind == "compressed_sparse_attention":
                index, picked, allowed = self._select(x, c_q_f, cos, sin, allowed)
                want_mass = index is not None and torch.is_grad_enabled()
                if 2 * picked.shape[-1] <= comp.shape[1]:  # score only the picked entries (see core_attention)
                    sel = picked
        sel = allowed if sel is None else sel

        c_q_b = c_q_f.transpose(0, 1).contiguous()  # [b, s, q_lora]: q_b_proj's input, kept for its backward
        mass = []

        def attend(q):
            o, m = self._run_core(q, kv_b, comp, sel, want_mass)
            if m is not None:
                mass.append(M._all_reduce(m, self.group))  # over all heads (no grad)
            return o

        if "mla_up_proj" in self.recompute_modules and torch.is_grad_enabled():
            # the per-head norm inside keeps q_b_proj's output: checkpointing _up_proj too drops it as well (it
            # is recomputed once more in _up_proj's own backward), so only c_q stays
            o = checkpoint_discard_output(self._up_proj, (c_q_b, cos_b, sin_b), attend, checkpoint_fn=True)
        else:
            o = attend(self._up_proj(c_q_b, cos_b, sin_b))
        indexer_loss = None
        if mass:
            indexer_loss = comp_mod.indexer.kl_loss(mass[0], index, allowed)

        o = apply_partial_rope(o, cos_b, sin_b, inverse=True)             # [b, s, H/tp, D]
        G = self.o_a_proj.n_local
        y = self.o_a_proj(o.reshape(b * s, G, -1))                         # [G, b*s, R]
        y = y.view(G, b, s, -1).permute(2, 1, 0, 3).reshape(s, b, -1)       # [s, b, G*R]
        return self.o_b_proj(y), indexer_loss

    def _run_core(self, q, kv, comp, sel, want_mass):
        if "core_attn" in self.recompute_modules and torch.is_grad_enabled():
            return checkpoint(self._core, q, kv, comp, sel, self.sinks, want_mass)
        return self._core(q, kv, comp, sel, self.sinks, want_mass)

    def _select(self, x, c_q_f, cos, sin, visible):
        """CSA: the indexer's scores when its loss is on and grad enabled (with grad to the indexer's weights, else
        None), its picks (long [b, s, k], -1 for none) and the same as a mask (bool [b, s, n])."""
        indexer = self.compressor.indexer
        train = self.indexer_loss_coeff > 0 and torch.is_grad_enabled()
        with torch.no_grad():
            x_full = M._gather_dim(x.detach(), 0, self.group) if self.sp else x.detach()
        with torch.set_grad_enabled(train):
            index = indexer.scores(x_full, c_q_f.detach(), cos, sin, lambda pos: self._rope.at("compress", pos))
        picked, selected = indexer.select(index, visible)
        return (index if train else None), picked, selected
