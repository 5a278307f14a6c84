"""Shared helpers for the MoE tests (tiny configs, HF <-> MoELayer weight mapping, distributed setup), plus
the grouped-matmul unit tests."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ascend.config import ModelConfig, ParallelConfig
from megatron_ascend.moe.experts import grouped_mm, loop_grouped_linear
from megatron_ascend.tensor_parallel.sharding import shard_spec
from tests.tolerance import assert_close

TINY_V3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
               routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512)
TINY_V2 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
               topk_method="group_limited_greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
               q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               max_position_embeddings=512)
TINY_V4 = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, n_routed_experts=8,
               num_experts_per_tok=2, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], swiglu_limit=0.3,
               routed_scaling_factor=1.5, num_attention_heads=4, o_groups=2)
LAYER = 1
V4_HASH_LAYER, V4_LAYER = 0, 2


def build_hf(kind: str, seed: int = 0, bias_std: float = 0.05):
    """HF DeepseekV3MoE / DeepseekV2Moe with random weights (router std 0.3 so routing is decisive)."""
    if kind in ("v4", "v4hash"):
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock
        hc = DeepseekV4Config(**TINY_V4)
        hc._experts_implementation = "eager"
        mod = DeepseekV4SparseMoeBlock(hc, V4_HASH_LAYER if kind == "v4hash" else V4_LAYER)
    elif kind == "v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Cls
        hc = DeepseekV3Config(**TINY_V3)
    else:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Cls
        hc = DeepseekV2Config(**TINY_V2)
    if kind in ("v2", "v3"):
        hc._experts_implementation = "eager"
        mod = Cls(hc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in mod.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if n == "gate.weight" else 0.1))
        if hasattr(mod.gate, "e_score_correction_bias"):
            mod.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * bias_std)
        if hasattr(mod.gate, "tid2eid"):  # a frozen random table: distinct experts per token
            k = mod.gate.tid2eid.shape[1]
            rows = [torch.randperm(8, generator=g)[:k] for _ in range(mod.gate.tid2eid.shape[0])]
            mod.gate.tid2eid.copy_(torch.stack(rows))
    return hc, mod


def model_cfg(hc, **over) -> ModelConfig:
    return ModelConfig.from_hf_dict(hc.to_dict(), **over)


def hf_to_ma(sd, inter: int):
    """HF MoE state dict (fused experts.gate_up_proj [E, 2I, h]) -> MoELayer full tensors by name."""
    out = {"gate.weight": sd["gate.weight"],
           "experts.gate_proj": sd["experts.gate_up_proj"][:, :inter],
           "experts.up_proj": sd["experts.gate_up_proj"][:, inter:],
           "experts.down_proj": sd["experts.down_proj"]}
    for b in ("gate.e_score_correction_bias", "gate.tid2eid"):
        if b in sd:
            out[b] = sd[b]
    for k in ("gate_proj", "up_proj", "down_proj"):
        out[f"shared_experts.{k}.weight"] = sd[f"shared_experts.{k}.weight"]
    return out


def load_full(layer, full) -> None:
    """Copy this rank's shard of each full tensor into the layer (slices from param.shard)."""
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name in full:
                t.copy_(full[name][shard_spec(t).slices(t.shape)])


def local_slice(full, t):
    return full[shard_spec(t).slices(t.shape)]


def moe_terms(cfg, tokens: int) -> int:
    """The ``terms`` (tests/tolerance.py) of a MoE layer's output and gradients: its chain of sums forward (router
    over h, the score normalisation over the experts, expert gate / up over h, down over the intermediate size
    (x shared experts), the combination of top-k routed + shared outputs), the same backward, and a weight
    gradient's sum over ``tokens``."""
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size * max(1, cfg.n_shared_experts)
    fwd = 2 * h + cfg.n_routed_experts + inter + cfg.num_experts_per_tok + cfg.n_shared_experts
    return 2 * fwd + tokens


def setup_groups(tp=1, ep=1, etp=None, sp=False, dispatcher="alltoall"):
    import torch.distributed as dist
    from megatron_ascend.parallel_state import initialize_model_parallel
    par = ParallelConfig(world_size=dist.get_world_size(), tensor_model_parallel_size=tp,
                         expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, sequence_parallel=sp,
                         moe_token_dispatcher_type=dispatcher)
    return par, initialize_model_parallel(par)


def reduce_grad(p, pg):
    """Sum a param grad over the ranks that hold replicas of the same shard (what DDP + the SP rule do)."""
    import torch.distributed as dist
    g = p.grad.clone()
    if getattr(p, "is_expert", False):
        grp = pg.edp
    elif getattr(p, "sequence_parallel", False):
        grp = pg.tp_dp_cp
    else:
        grp = pg.dp
    if dist.get_world_size(grp) > 1:
        dist.all_reduce(g, group=grp)
    return g


# ---- grouped matmul ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,k,n", [(torch.float32, 16, 8), (torch.float32, 7, 5), (torch.float64, 16, 8)])
def test_grouped_mm_matches_per_group_matmul(dtype, k, n):
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(sum(counts), k, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), k, n, generator=g, dtype=dtype, requires_grad=True)
    gy = torch.randn(sum(counts), n, generator=g, dtype=dtype)
    y = grouped_mm(x, w, counts)
    y.backward(gy)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    parts, s = [], 0
    for i, c in enumerate(counts):
        parts.append(xr[s:s + c] @ wr[i])
        s += c
    yr = torch.cat(parts)
    yr.backward(gy)
    # y and x.grad sum over k / n; a group's weight grad over its rows (at most 5)
    assert_close(y, yr, "grouped_mm out", terms=k)
    assert_close(x.grad, xr.grad, "grouped_mm dx", terms=n)
    assert_close(w.grad, wr.grad, "grouped_mm dw", terms=max(counts))
    # the memory-bounded loop fallback agrees with the native path too, values and gradients
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = loop_grouped_linear(x2, w2.transpose(1, 2), counts)
    y2.backward(gy)
    assert_close(y2, yr, "loop fallback out", terms=k)
    assert_close(x2.grad, xr.grad, "loop fallback dx", terms=n)
    assert_close(w2.grad, wr.grad, "loop fallback dw", terms=max(counts))


def test_grouped_mm_zero_rows_keeps_weights_in_graph():
    w = torch.randn(3, 8, 4, requires_grad=True)
    y = grouped_mm(torch.zeros(0, 8), w, [0, 0, 0])
    assert y.shape == (0, 4)
    y.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0


def test_grouped_mm_transposed_weight_view():
    torch.manual_seed(0)
    base = torch.randn(2, 12, 16, requires_grad=True)  # [E, I, h] as stored; used as [E, h, I]
    x = torch.randn(5, 16)
    y = grouped_mm(x, base.transpose(1, 2), [2, 3])
    ref = torch.cat([x[:2] @ base[0].t(), x[2:] @ base[1].t()])
    assert_close(y, ref, "transposed-view grouped_mm out", terms=16)  # sums over h = 16
    y.square().sum().backward()
    b2 = base.detach().clone().requires_grad_()
    torch.cat([x[:2] @ b2[0].t(), x[2:] @ b2[1].t()]).square().sum().backward()
    assert_close(base.grad, b2.grad, "transposed-view grouped_mm weight grad", terms=16)  # 4 out x <= 3 rows


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
