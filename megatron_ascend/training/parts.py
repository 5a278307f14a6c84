"""The trainer's view of the other packages: one function per thing the loop needs from them.

Everything the training loop calls from models/, pipeline_parallel/, distributed/, optimizer/, moe/ and
checkpointing/ goes through here, so the loop itself reads as Megatron's ``pretrain()`` and the package
interfaces are visible in one place (docs/ARCHITECTURE.md, "Interfaces between packages").
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig


# -- seeds ------------------------------------------------------------------------------------------------
def seed_everything(seed: int, groups) -> None:
    """Python / NumPy / torch seeds plus the tensor-parallel RNG tracker (Megatron's per-rank offsets).
    Weight init does not depend on these (sharding.init_normal_ draws by global name)."""
    from ..tensor_parallel.random import model_parallel_seed
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    model_parallel_seed(seed, groups)


# -- model ---------------------------------------------------------------------------------------------------
def build_model_chunks(model_cfg: ModelConfig, par: ParallelConfig, opt_cfg: OptimizerConfig,
                       train_cfg: TrainingConfig, groups, placement) -> List[torch.nn.Module]:
    """One model (models.build_model: by model_type) per virtual pipeline stage of this rank (from the placement:
    layers, embedding, MTP, head + loss), each in a DistributedDataParallel."""
    from ..distributed import DistributedDataParallel
    from ..models import build_model
    from ..pipeline_parallel.embedding_sync import sync_embedding_weights
    from ..pipeline_parallel.stage_split import chunk_specs
    dtype = torch.bfloat16 if opt_cfg.bf16 else (torch.float16 if opt_cfg.fp16 else torch.float32)
    chunks = []
    for spec in chunk_specs(placement, groups.pp_rank):
        m = build_model(model_cfg, par, groups, pre_process=spec.pre_process, post_process=spec.post_process,
                        layer_ids=spec.layer_ids, include_mtp=spec.include_mtp, mtp_in_input=spec.mtp_in_input,
                        padded_vocab_size=model_cfg.vocab_size, init_seed=train_cfg.seed)
        _apply_recompute(m, train_cfg)
        if dtype != torch.float32:
            _cast_keep_fp32_buffers(m, dtype)
        m.to(_device())
        chunks.append(DistributedDataParallel(m, groups, bucket_size=opt_cfg.bucket_size,
                                              overlap_grad_reduce=opt_cfg.overlap_grad_reduce,
                                              gradient_accumulation_fusion=opt_cfg.gradient_accumulation_fusion,
                                              use_distributed_optimizer=par.use_distributed_optimizer))
    sync_embedding_weights(chunks, groups)
    return chunks


def logging_rank(par: ParallelConfig, placement) -> int:
    """The global rank that logs and writes TensorBoard: the last rank of the pipeline stage that computes the
    loss (Megatron logs from the last rank; the stage comes from the placement, not from ``world - 1``)."""
    from ..parallel_state import RankLayout
    return max(g[placement.loss_pp_rank] for g in RankLayout(par).pp)


def _apply_recompute(model, train_cfg: TrainingConfig) -> None:
    """--recompute-granularity / --recompute-method / --recompute-num-layers / --recompute-modules."""
    if not train_cfg.recompute_granularity:
        return
    from .. import recompute
    recompute.apply_recompute(model, train_cfg)


def _cast_keep_fp32_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters to bf16/fp16; fp32 buffers (router bias) and params marked ``keep_fp32`` stay fp32
    (the router weight is fp32 in DeepSeek's recipe; V4 keeps its norms, mHC parameters and attention sinks /
    position biases fp32, as transformers does)."""
    for name, p in module.named_parameters():
        if p.dtype == torch.float32 and not getattr(p, "keep_fp32", False) and not name.endswith("gate.weight"):
            p.data = p.data.to(dtype)


def _device() -> torch.device:
    from .. import platform
    return platform.get_platform().device()


def unwrap(chunk):
    return getattr(chunk, "module", chunk)


def call_model(chunk, batch: Dict[str, torch.Tensor]):
    """Run one chunk on one micro-batch: the model's per-token losses (last stage) or hidden states."""
    kw = dict(input_ids=batch["tokens"], position_ids=batch.get("position_ids"), labels=batch["labels"],
              loss_mask=batch["loss_mask"])
    if "segment_ids" in batch:
        kw["segment_ids"] = batch["segment_ids"]
    return chunk(**kw)


def mtp_scale(cfg: ModelConfig) -> float:
    d = cfg.num_nextn_predict_layers
    return cfg.mtp_loss_scaling_factor / d if d else 0.0


# -- schedule and grads ------------------------------------------------------------------------------------
def get_forward_backward_func(pp: int, vp: int, microbatch_group_size: Optional[int] = None):
    from ..pipeline_parallel.schedules import get_forward_backward_func as get
    return get(pp, vp, microbatch_group_size=microbatch_group_size)


def finalize_grads(model_chunks, groups) -> None:
    """Finish the dp / expert-dp reduction, then sum the embedding copies' grads over the embedding group.

    In this order because with --overlap-grad-reduce an embedding copy's bucket may already be reducing
    asynchronously when backward ends: the sum must not read or write that main_grad before the reduction is
    waited for. It is correct after the reduce-scatter of the distributed optimizer too: every copy has a
    bucket of its own (grad_buffer.py), so first and last stage (same dp index) own the same range of it, and
    the sum is linear. tests/test_ddp_deepseek.py runs this order at PP2 with distopt and with overlap."""
    from ..pipeline_parallel.embedding_sync import allreduce_embedding_grads
    for c in model_chunks:
        c.finish_grad_sync()
    allreduce_embedding_grads(model_chunks, groups)


# -- optimizer -------------------------------------------------------------------------------------------------
def build_optimizer(model_chunks, opt_cfg: OptimizerConfig, train_cfg: TrainingConfig, par: ParallelConfig,
                    groups):
    from ..optimizer import OptimizerParamScheduler, build_optimizer as build
    from ..config import ConfigError
    opt = build(model_chunks, opt_cfg, groups, par.use_distributed_optimizer)
    try:
        sched = OptimizerParamScheduler(opt, opt_cfg, train_cfg.train_iters)
    except ValueError as e:  # the schedule's flag rules (warm-up vs decay iterations ...) are config errors
        raise ConfigError(str(e)) from e
    return opt, sched


def loss_scale(optimizer) -> Optional[float]:
    """The current loss scale (fp16 dynamic scaling), or None without one."""
    if getattr(optimizer, "grad_scaler", None) is None:
        return None
    return float(optimizer.get_loss_scale())


def current_lr(optimizer, scheduler) -> float:
    """The learning rate the last optimizer step used (Megatron logs the param group's lr)."""
    groups = optimizer.param_groups
    return float(groups[0]["lr"]) if groups else float(scheduler.get_lr())


# -- MoE -------------------------------------------------------------------------------------------------------
def update_expert_bias(model_chunks, groups, rate: float) -> None:
    """Aux-loss-free balancing: after each successful optimizer step (no-op without noaux_tc routers)."""
    from ..moe.load_balancing import update_expert_bias as update
    if rate:
        update([unwrap(c) for c in model_chunks], groups, rate)


def set_aux_loss_scale(num_microbatches: int, groups, loss_scale: Optional[float]) -> None:
    """Aux losses are means per micro-batch; the single-process loss is their mean over the global batch. Their
    injected gradients also carry this step's fp16 loss scale, as the LM loss does (the schedule multiplies it
    in; the optimizer divides every gradient by it). Call before every step: the loss scale changes."""
    from ..moe.load_balancing import set_aux_loss_scale as set_scale
    set_scale(1.0 / (num_microbatches * groups.loss_size), loss_scale or 1.0)  # the token count's group


def moe_stats(model_chunks, groups) -> Dict[str, float]:
    """collect_load_stats of every stage, gathered over the pipeline group (collective on all ranks)."""
    from ..moe.load_balancing import collect_load_stats
    local = collect_load_stats([unwrap(c) for c in model_chunks], groups)
    if groups is not None and groups.pp_size > 1:
        gathered = [None] * groups.pp_size
        dist.all_gather_object(gathered, local, group=groups.pp)
        merged: Dict[str, float] = {}
        for d in gathered:
            merged.update(d)
        return merged
    return local


def moe_log_values(stats: Dict[str, float], num_moe_layers: int) -> Dict[str, Dict[str, float]]:
    """Split collect_load_stats into the logged losses (``load_balancing_loss`` = sum over layers of the
    balance-loss values, Megatron's convention) and the per-layer TensorBoard scalars
    (``moe/tokens_per_expert_imbalance_layer_{i}`` = max / mean tokens per expert, ``moe/{aux}_layer_{i}``)."""
    losses: Dict[str, float] = {}
    scalars: Dict[str, float] = {}
    worst = 0.0
    for key, v in stats.items():
        if not key.startswith("moe/layer_"):
            continue
        layer, name = key[len("moe/layer_"):].split("/", 1)
        if name == "max_over_mean":
            scalars[f"moe/tokens_per_expert_imbalance_layer_{layer}"] = v
            worst = max(worst, v)
        elif name in ("max_tokens", "mean_tokens"):
            continue
        else:
            scalars[f"moe/{name}_layer_{layer}"] = v
            if name in ("seq_aux_loss", "aux_loss", "balance_loss", "load_balancing_loss"):
                losses["load_balancing_loss"] = losses.get("load_balancing_loss", 0.0) + v
            elif name == "z_loss":
                losses["z_loss"] = losses.get("z_loss", 0.0) + v
    if scalars:
        scalars["moe/tokens_per_expert_imbalance_max"] = worst
    return {"losses": losses, "scalars": scalars}


# -- checkpoints --------------------------------------------------------------------------------------------
def checkpoint_exists(load_dir: str, partial_ok: bool = False) -> bool:
    """Whether ``load_dir`` holds a complete checkpoint (not yet verified: load does that). A HuggingFace
    model directory, or (unless ``partial_ok``: --load is --save) one with interrupted saves only, is a
    CheckpointError naming the fix."""
    from ..checkpointing import checkpoint_candidates
    return bool(checkpoint_candidates(load_dir, partial_ok=partial_ok))


def save_checkpoint(save_dir, iteration, model_chunks, optimizer, scheduler, groups, extra_state,
                    save_retain=None, save_optim=True, save_rng=True, async_save=False):
    """--save-retain, --no-save-optim, --no-save-rng, --async-save as checkpointing.save_checkpoint takes them."""
    from ..checkpointing import save_checkpoint as save
    return save(save_dir, iteration, model_chunks, optimizer, scheduler, groups, extra_state,
                save_retain=save_retain, save_optim=save_optim, save_rng=save_rng, async_save=async_save)


def load_checkpoint(load_dir, model_chunks, optimizer, scheduler, groups, train_cfg: TrainingConfig):
    from ..checkpointing import load_checkpoint as load
    t = train_cfg
    return load(load_dir, model_chunks, optimizer, scheduler, groups, finetune=t.finetune,
                no_load_optim=t.no_load_optim, no_load_rng=t.no_load_rng, verify=t.ckpt_verify,
                fallback=t.ckpt_fallback, override_scheduler=t.override_opt_param_scheduler,
                use_checkpoint_scheduler=t.use_checkpoint_opt_param_scheduler)


def wait_for_checkpoint() -> None:
    from ..checkpointing import wait_for_pending_save
    wait_for_pending_save()
