"""The real tiny DeepSeek-V3 (MLA, dense + MoE layers with the sequence aux loss, MTP) trained for three Adam
steps with clipping through DistributedDataParallel + the (distributed) optimizer and the library's schedules
equals the single-process torch-only run (plain backward, clip_grad_norm_, torch.optim.AdamW) at
TP2(SP) x DP2 x EP2 (expert-TP 1) with the distributed optimizer and overlapped bucketed reductions, and at
PP2 x DP2 x EP2 (MTP ties the embedding across stages; the tied copy gets a bucket of its own so the
embedding all-reduce is correct after the reduce-scatter). fp32; the grad norm of every step is compared
too."""
from __future__ import annotations

import torch

from tests.harness import run_distributed
from tests.tolerance import ADAM_AMPLIFICATION, MODEL_REL, assert_rel

B, S, M, STEPS = 2, 8, 2, 3  # micro batch, sequence, microbatches per dp rank, optimizer steps


def _config():
    from megatron_ascend.config import ModelConfig
    return ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                       aux_loss_alpha=0.01, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3,
                       tie_word_embeddings=False, max_position_embeddings=64, init_method_std=0.05)


def _batches(step, n):
    out = []
    for j in range(n):
        g = torch.Generator().manual_seed(1000 * step + j)
        out.append({"input_ids": torch.randint(0, 64, (B, S), generator=g),
                    "labels": torch.randint(0, 64, (B, S), generator=g),
                    "loss_mask": (torch.rand(B, S, generator=g) > 0.2).float()})
    return out


def _forward_step(data_iterator, chunk):
    batch = next(data_iterator)
    out = chunk(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])

    def loss_func(o):
        lm = (o["lm_loss"] * batch["loss_mask"]).sum()
        mtp = sum(l.sum() for l in o["mtp_losses"])
        return lm + o["mtp_loss_scale"] * mtp, batch["loss_mask"].sum(), {"lm": lm.detach()}
    return out, loss_func


def _opt_cfg():
    from megatron_ascend.config import OptimizerConfig
    return OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=0.5, adam_beta1=0.9, adam_beta2=0.95)


def _reference(cfg, dp):
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.moe import set_aux_loss_scale
    from megatron_ascend.pipeline_parallel import forward_backward_no_pipelining
    ref = DeepseekForCausalLM(cfg, ParallelConfig(world_size=1), None)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    oc = _opt_cfg()
    opt = torch.optim.AdamW([{"params": [p for n, p in named if p.dim() > 1 and not n.endswith(".bias")],
                              "weight_decay": oc.weight_decay},
                             {"params": [p for n, p in named if p.dim() <= 1 or n.endswith(".bias")],
                              "weight_decay": 0.0}], lr=oc.lr, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_eps)
    set_aux_loss_scale(1.0 / (M * dp))
    norms = []
    for step in range(STEPS):
        data = _batches(step, M * dp)
        opt.zero_grad()
        n_all = sum(b["loss_mask"].sum() for b in data)
        forward_backward_no_pipelining(_forward_step, iter(data), [ref], len(data), None, num_tokens=n_all)
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in named], oc.clip_grad)))
        opt.step()
    return {n: p.detach() for n, p in named}, norms


def _case(tag, par, distributed, overlap, bucket_size):
    from megatron_ascend.distributed import DistributedDataParallel
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.moe import set_aux_loss_scale
    from megatron_ascend.optimizer import build_optimizer
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.pipeline_parallel import (allreduce_embedding_grads, count_global_tokens,
                                                   get_forward_backward_func, mark_shared_embedding,
                                                   model_chunk_specs, sync_embedding_weights)
    from megatron_ascend.tensor_parallel.sharding import shard_spec

    pg = initialize_model_parallel(par)
    cfg = _config()
    ref_params, ref_norms = _reference(cfg, pg.dp_size)
    modules = []
    for spec in model_chunk_specs(cfg.num_hidden_layers, par.pp, pg.pp_rank, 1):
        m = DeepseekForCausalLM(cfg, par, pg, pre_process=spec.pre_process, post_process=spec.post_process,
                                layer_ids=spec.layer_ids)
        w = getattr(getattr(m.model, "embed_tokens", None), "weight", None)
        if spec.pre_process and par.pp > 1 and w is not None and not getattr(w, "shared_embedding", False):
            mark_shared_embedding(w, canonical=True)
        modules.append(m)
    sync_embedding_weights(modules, pg)
    init = {n: p.detach().clone() for m in modules for n, p in m.named_parameters()}
    chunks = [DistributedDataParallel(m, pg, bucket_size=bucket_size, overlap_grad_reduce=overlap,
                                      use_distributed_optimizer=distributed) for m in modules]
    opt = build_optimizer(chunks, _opt_cfg(), pg)
    set_aux_loss_scale(1.0 / (M * pg.dp_size))
    fb = get_forward_backward_func(par.pp, 1)
    norms = []
    for step in range(STEPS):
        mine = _batches(step, M * pg.dp_size)[pg.dp_rank * M:(pg.dp_rank + 1) * M]
        opt.zero_grad()
        ntok = count_global_tokens([b["loss_mask"] for b in mine], pg)
        fb(_forward_step, iter(mine), chunks, M, pg, num_tokens=ntok)
        for c in chunks:  # what the trainer's finalize_grads does
            c.finish_grad_sync()
        allreduce_embedding_grads(chunks, pg)
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
    where = f"rank {pg.rank} {tag}"
    n = 0
    for c in chunks:
        for name, p in c.module.named_parameters():
            want = ref_params[name][shard_spec(p).slices(tuple(p.shape))]
            # p - want, judged on the scale of what the 3 Adam steps moved the reference (tests/tolerance.py)
            assert_rel(p.detach() - init[name], want - init[name], ADAM_AMPLIFICATION * MODEL_REL,
                       f"{where}: update of {name} after {STEPS} steps")
            n += 1
    assert_rel(torch.tensor(norms), torch.tensor(ref_norms), MODEL_REL, f"{where}: grad norm of every step")
    return {"n": n, "clipped": min(ref_norms) > _opt_cfg().clip_grad}


def _body():
    from megatron_ascend.config import ParallelConfig
    tp = ParallelConfig(world_size=4, tensor_model_parallel_size=2, sequence_parallel=True,
                        expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    pp = ParallelConfig(world_size=4, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    return {"tp2sp_dp2_ep2_distopt_overlap": _case("tp2sp_dp2_ep2_distopt_overlap", tp, True, True, 2000),
            "pp2_dp2_ep2_distopt": _case("pp2_dp2_ep2_distopt", pp, True, False, None),
            "pp2_dp2_ep2": _case("pp2_dp2_ep2", pp, False, True, 3000)}


def test_deepseek_ddp_optimizer_equal_single_process():
    results = run_distributed(4, _body, timeout=400)
    for rank, res in enumerate(results):
        for name, r in res.items():
            where = f"rank {rank} {name}"
            assert r["n"] > 10, where
            assert r["clipped"], f"{where}: clipping inactive; lower clip_grad"
