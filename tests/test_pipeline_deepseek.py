"""A tiny DeepSeek-V3 model (MLA, dense + MoE layers with the sequence aux loss, MTP on) split over pipeline
stages equals the single-process model on the same data: every per-microbatch loss (LM and MTP) and every
gradient, at PP 2 (1F1B), PP 2 x virtual 2 (interleaved), PP 2 x TP 2 with sequence parallel, and PP 2 x EP 2,
with tied and untied embeddings. The single-process reference is the same DeepseekForCausalLM built with all
layers, one chunk, no process groups (layout-independent init makes the weights equal)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.harness import run_distributed
from tests.tolerance import MODEL_REL, assert_equal, assert_rel

B, S, M = 2, 8, 4  # micro batch, sequence, microbatches per dp rank


def _config(tie=False, layers=4):
    from megatron_ascend.config import ModelConfig
    return ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                       aux_loss_alpha=0.01, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3,
                       tie_word_embeddings=tie, max_position_embeddings=64, init_method_std=0.05)


def _batches(n, seed):
    out = []
    for j in range(n):
        g = torch.Generator().manual_seed(seed * 100 + j)
        ids = torch.randint(0, 64, (B, S), generator=g)
        labels = torch.randint(0, 64, (B, S), generator=g)
        mask = (torch.rand(B, S, generator=g) > 0.2).float()
        out.append({"input_ids": ids, "labels": labels, "loss_mask": mask})
    return out


def _forward_step(data_iterator, chunk):
    batch = next(data_iterator)
    out = chunk(batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])

    def loss_func(o):
        mask = batch["loss_mask"]
        lm = (o["lm_loss"] * mask).sum()
        mtp = sum(l.sum() for l in o["mtp_losses"])
        return lm + o["mtp_loss_scale"] * mtp, mask.sum(), {"lm": lm.detach(), "mtp": mtp.detach()}
    return out, loss_func


def _build(cfg, par, pg, vp):
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.pipeline_parallel import model_chunk_specs
    chunks = []
    for spec in model_chunk_specs(cfg.num_hidden_layers, par.pp, pg.pp_rank, vp):
        m = DeepseekForCausalLM(cfg, par, pg, pre_process=spec.pre_process, post_process=spec.post_process,
                                layer_ids=spec.layer_ids)
        # the model itself marks the first stage's embedding as the tie's canonical copy (MTP / tied head)
        chunks.append(m)
    return chunks


def _case(par, vp, tie, seed):
    from megatron_ascend.config import ParallelConfig
    from megatron_ascend.models.deepseek import DeepseekForCausalLM
    from megatron_ascend.moe import set_aux_loss_scale
    from megatron_ascend.parallel_state import initialize_model_parallel
    from megatron_ascend.pipeline_parallel import (allreduce_embedding_grads, count_global_tokens,
                                                   forward_backward_no_pipelining, get_forward_backward_func,
                                                   sync_embedding_weights)
    from megatron_ascend.tensor_parallel import allreduce_sequence_parallel_grads
    from megatron_ascend.tensor_parallel.sharding import shard_spec

    pg = initialize_model_parallel(par)
    tag = f"pp{par.pp} vp{vp} tp{par.tp} ep{par.ep} dp{par.dp} sp{par.sequence_parallel} tie{tie}"
    cfg = _config(tie)
    set_aux_loss_scale(0.25)
    data = _batches(M * pg.dp_size, seed)
    mine = data[pg.dp_rank * M:(pg.dp_rank + 1) * M]

    ref = DeepseekForCausalLM(cfg, ParallelConfig(world_size=1), None)
    n_all = sum(b["loss_mask"].sum() for b in data)
    ref_losses = forward_backward_no_pipelining(_forward_step, iter(data), [ref], len(data), None, num_tokens=n_all)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_params = dict(ref.named_parameters())

    chunks = _build(cfg, par, pg, vp)
    sync_embedding_weights(chunks, pg)
    for c in chunks:
        for n, p in c.named_parameters():
            want = ref_params[n].detach()[shard_spec(p).slices(p.shape)]
            assert_equal(p.detach(), want, f"{tag}: initial {n} vs the single-process model")
    ntok = count_global_tokens([b["loss_mask"] for b in mine], pg)
    fb = get_forward_backward_func(par.pp, vp)
    losses = fb(_forward_step, iter(mine), chunks, M, pg, num_tokens=ntok)

    if pg.is_last_stage:
        want = ref_losses[pg.dp_rank * M:(pg.dp_rank + 1) * M]
        for j, (g, w) in enumerate(zip(losses, want)):
            for k in ("lm", "mtp"):  # whole-model figures (tests/tolerance.py MODEL_REL)
                assert_rel(g[k], w[k], MODEL_REL, f"{tag}: microbatch {j} {k} loss")
    # what the DDP wrapper and the trainer do after the schedule: SP grads over tp, dp reduction, embedding tie
    for c in chunks:
        if par.tp > 1:
            allreduce_sequence_parallel_grads(c.parameters(), pg)
    for c in chunks:
        for p in c.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            group = pg.edp if getattr(p, "is_expert", False) else pg.dp
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
    tied = allreduce_embedding_grads(chunks, pg)
    assert tied == (pg.is_first_stage or pg.is_last_stage), f"{tag}: MTP needs the embedding tie"
    checked = 0
    for c in chunks:
        for n, p in c.named_parameters():
            want = ref_grads[n]
            want = torch.zeros_like(ref_params[n]) if want is None else want
            want = want[shard_spec(p).slices(p.shape)]
            assert_rel(p.grad, want, MODEL_REL, f"{tag}: grad of {n}")
            checked += 1
    return checked


def _world2_body():
    from megatron_ascend.config import ParallelConfig
    par = ParallelConfig(world_size=2, pipeline_model_parallel_size=2)
    return [_case(par, 1, False, 1), _case(par, 1, True, 2), _case(par, 2, False, 3)]


def _world4_body():
    from megatron_ascend.config import ParallelConfig
    tp = ParallelConfig(world_size=4, pipeline_model_parallel_size=2, tensor_model_parallel_size=2,
                        sequence_parallel=True)
    ep = ParallelConfig(world_size=4, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    return [_case(tp, 1, False, 4), _case(ep, 1, True, 5), _case(ep, 2, False, 6)]


def test_deepseek_pp2_and_pp2_vp2_equal_single_process():
    counts = run_distributed(2, _world2_body, timeout=400)
    assert all(min(c) > 10 for c in counts)


def test_deepseek_pp2_with_tp2_sp_and_ep2_equal_single_process():
    counts = run_distributed(4, _world4_body, timeout=500)
    assert all(min(c) > 10 for c in counts)
