"""Megatron-LM / MindSpeed-LLM compatible command-line flags -> the frozen config dataclasses.

``parse_args(argv)`` returns the argparse namespace (foreign flags resolved by arguments_compat: aliases
applied, refused flags and contradicting values raised, ``args.compat_resolved`` holding the start-up line);
``build_configs(args, world_size)`` returns (model, parallel, optimizer, training, data) after every rule in
config.py has been checked.

The model: ``--model-config PATH`` reads a HuggingFace config.json and flags override it; without it the
family of ``--model-type`` gives the defaults (config.family_defaults), and a Megatron-style description
(``--multi-latent-attention``) takes Megatron-LM's defaults for what it leaves out (MEGATRON_MODEL_DEFAULTS).
Errors are ConfigError; entry points turn them into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional, Tuple

from . import arguments_compat as compat
from .config import (ConfigError, DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, RopeScaling,
                     TrainingConfig, family_defaults, validate_all)

# flag -> ModelConfig field (Megatron name first; DeepSeek/HF names where Megatron has none)
_MODEL_FLAGS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_nope_head_dim", "qk_pos_emb_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "num_experts": "n_routed_experts", "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_topk": "num_experts_per_tok", "moe_router_num_groups": "n_group",
    "moe_router_group_topk": "topk_group", "moe_router_score_function": "scoring_func",
    "moe_router_topk_scaling_factor": "routed_scaling_factor", "moe_router_topk_method": "topk_method",
    "first_k_dense_replace": "first_k_dense_replace", "moe_layer_freq": "moe_layer_freq",
    "moe_aux_loss_coeff": "aux_loss_alpha", "mtp_num_layers": "num_nextn_predict_layers",
    "mtp_loss_scaling_factor": "mtp_loss_scaling_factor", "norm_epsilon": "rms_norm_eps",
    "rotary_base": "rope_theta", "max_position_embeddings": "max_position_embeddings",
    "vocab_size": "vocab_size", "init_method_std": "init_method_std", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "model_type": "model_type",
}


def _int_list(text: str) -> Tuple[int, ...]:
    """'4,4,4,4' (or '4 4 4 4') -> (4, 4, 4, 4)."""
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 61,62,63")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (DeepSeek architecture; overrides --model-config)")
    g.add_argument("--model-config", default=None, help="HuggingFace config.json of a DeepSeek V2/V3/V3.2/V4 model")
    g.add_argument("--model-type", default=None,
                   help="deepseek_v2 | deepseek_v3 | deepseek_v32 | deepseek_v4: the family whose defaults the "
                        "architecture flags start from (deepseek_v3 when not given)")
    g.add_argument("--num-layers", type=int, default=None, help="decoder layers (num_hidden_layers)")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="dense FFN width (intermediate_size)")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--q-lora-rank", type=int, default=None, help="MLA query latent rank (0 = V2-Lite q_proj)")
    g.add_argument("--kv-lora-rank", type=int, default=None, help="MLA key/value latent rank")
    g.add_argument("--qk-head-dim", type=int, default=None, help="MLA no-rope head dim (qk_nope_head_dim)")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=None, help="MLA decoupled RoPE dim (qk_rope_head_dim)")
    g.add_argument("--v-head-dim", type=int, default=None)
    g.add_argument("--num-experts", type=int, default=None, help="routed experts (n_routed_experts); 0 = dense")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert FFN width")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="total shared-expert width (n_shared_experts x moe-ffn-hidden-size)")
    g.add_argument("--n-shared-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token")
    g.add_argument("--moe-router-num-groups", type=int, default=None, help="expert groups (n_group)")
    g.add_argument("--moe-router-group-topk", type=int, default=None, help="groups kept per token (topk_group)")
    g.add_argument("--moe-router-score-function", default=None, help="softmax | sigmoid | sqrtsoftplus")
    g.add_argument("--moe-router-topk-method", default=None, help="greedy | group_limited_greedy | noaux_tc")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None, help="routed_scaling_factor")
    g.add_argument("--norm-topk-prob", dest="norm_topk_prob", action="store_true", default=None)
    g.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false")
    g.add_argument("--first-k-dense-replace", type=int, default=None, help="leading dense-FFN layers")
    g.add_argument("--moe-layer-freq", default=None,
                   help="MoE every N-th layer after --first-k-dense-replace, or Megatron's per-layer list "
                        "'([0]*3+[1]*58)' (read without eval)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None, help="sequence-wise balance loss alpha")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="aux-loss-free expert-bias step gamma (0 disables)")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall", help="alltoall | allgather")
    g.add_argument("--mtp-num-layers", type=int, default=None, help="multi-token-prediction modules")
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=None, help="MTP loss weight lambda")
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--rotary-base", type=float, default=None, help="rope_theta")
    g.add_argument("--rope-scaling-factor", type=float, default=None, help="YaRN factor (enables YaRN)")
    g.add_argument("--rope-scaling-original-max-position-embeddings", type=int, default=None)
    g.add_argument("--rope-scaling-mscale", type=float, default=None)
    g.add_argument("--rope-scaling-mscale-all-dim", type=float, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="model vocab (default: the tokenizer's, padded)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--init-method-std", type=float, default=None, help="init std (DeepSeek: 0.006)")
    g.add_argument("--index-n-heads", type=int, default=None, help="V3.2 DSA indexer heads")
    g.add_argument("--index-head-dim", type=int, default=None)
    g.add_argument("--index-topk", type=int, default=None)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-layout", default=None,
                   help="place every part by hand (Megatron-Core's string): stages split by '|', E embedding, t decoder "
                        "layer, m MTP layer, L loss, X*n and (...)*n repeat; VP = stages / PP. DeepSeek-V3 at PP 16 x "
                        "VP 2: 'Et*3|(tt|)*29,m|L'. docs/PARALLELISM.md, 'Layer placement'")
    g.add_argument("--num-layer-list", type=_int_list, default=(),
                   help="layer slots per pipeline stage, comma-separated (MindSpeed-LLM), e.g. 4,4,4,4; or one per "
                        "virtual stage (pp x vp numbers, model order); sums to --num-layers")
    g.add_argument("--noop-layers", type=_int_list, default=(),
                   help="layer slots (in --num-layers numbering) that are identity layers padding the split "
                        "(MindSpeed-LLM): --num-layers 64 --noop-layers 61,62,63 is a 61-layer model split as 64; "
                        "they hold no parameters and the real layers keep their ids 0..60")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="microbatch_group_size_per_vp_stage",
                   type=int, default=None,
                   help="interleaved schedule: micro-batches per group (default PP); lets a micro-batch count that "
                        "is not a multiple of PP interleave (e.g. the count itself)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="only 1 for training: context parallelism is not built yet (a larger value is refused)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None, help="default: same as TP")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   help="compute weight grads into fresh tensors and add them into the grad buffer (zero-filled "
                        "each step) instead of writing them into main_grad from the GEMM")
    g.add_argument("--show-layout", action="store_true", help="print every process group and exit")
    g.add_argument("--hccl-connect-timeout", type=int, default=None,
                   help="Ascend: HCCL_CONNECT_TIMEOUT, seconds to set up HCCL links [120, 7200] (HCCL default 120; "
                        "MindSpeed-LLM's DeepSeek-V3 scripts use 3600). Unset: the environment's value is kept")
    g.add_argument("--hccl-exec-timeout", type=int, default=None,
                   help="Ascend: HCCL_EXEC_TIMEOUT, seconds one collective may wait [0, 2147483647], 0 = never "
                        "(HCCL default 1836). Keep it below the process-group timeout")
    g.add_argument("--hccl-buffsize", type=int, default=None,
                   help="Ascend: HCCL_BUFFSIZE, MB per communicator buffer (x2: send and receive; HCCL default "
                        "200). About micro-batch x seq x hidden x bytes per element / 2**20 for the MoE all-to-all")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-retain", type=int, default=None, help="keep only the newest K checkpoints")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and optimizer")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-at-loss", type=float, default=None,
                   help="stop (saving a checkpoint with --save) once the mean lm loss of the last "
                        "--exit-at-loss-window iterations is <= this value (reference recipes: train to a loss)")
    g.add_argument("--exit-at-loss-window", type=int, default=10,
                   help="iterations --exit-at-loss averages over")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=[],
                   help="selective recompute parts: core_attn mla_up_proj moe_act layernorm mlp moe shared_experts "
                        "mhc (DeepSeek-V4: the mHC mixing coefficients)")
    g.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: platform table)")
    g.add_argument("--no-fused-kernels", action="store_true",
                   help="run every kernel-table entry with its plain-PyTorch reference (no torch_npu / MindSpeed / "
                        "fused torch kernels); the start-up 'kernels:' line names what runs")
    g.add_argument("--reference-kernels", nargs="*", default=[], metavar="NAME",
                   help="these kernel-table entries use their reference: rms_norm rope_interleaved attention "
                        "swiglu grouped_matmul moe_permute router_topk")
    g.add_argument("--device-launch-blocking", action="store_true",
                   help="debugging: synchronous kernel launches (ASCEND_LAUNCH_BLOCKING=1 / CUDA_LAUNCH_BLOCKING=1): "
                        "exact error locations, slow")
    g.add_argument("--jit-compile", action="store_true",
                   help="Ascend: torch_npu.npu.set_compile_mode(jit_compile=True) (default False, the A2 / A3 "
                        "binary kernels, as MindSpeed)")
    g.add_argument("--profile", action="store_true",
                   help="record iterations [--profile-step-start, --profile-step-end) with torch_npu.profiler "
                        "(NPU) or torch.profiler (CUDA / CPU)")
    g.add_argument("--profile-step-start", type=int, default=10, help="first profiled iteration (from 1)")
    g.add_argument("--profile-step-end", type=int, default=12, help="first iteration not profiled")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that profile")
    g.add_argument("--profile-save-path", default=None,
                   help="trace directory (TensorBoard trace handler; default --tensorboard-dir, else ./profile)")
    # reliability (docs/CHECKPOINTS.md, docs/USER_GUIDE.md "Failures")
    g.add_argument("--ckpt-verify", default="checksum", choices=["checksum", "size"],
                   help="before loading, check every checkpoint file's recorded size and SHA-256 (checksum; the "
                        "hashing is spread over the ranks) or its size only")
    g.add_argument("--no-ckpt-fallback", dest="ckpt_fallback", action="store_false",
                   help="refuse a newest checkpoint that is incomplete or corrupt instead of loading the newest "
                        "intact older one (with a warning)")
    g.add_argument("--override-opt_param-scheduler", dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use this run's learning-rate schedule flags when the checkpoint's differ")
    g.add_argument("--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler",
                   action="store_true",
                   help="on resume, continue on the checkpoint's learning-rate schedule when this run's flags differ")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="check the loss and the grad norm of every step for NaN / Inf and report the "
                                      "ranks (and with --nan-trace-modules the first module); see --nan-policy")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="skip NaN / Inf steps silently (the optimizer still skips them)")
    g.add_argument("--nan-policy", default="stop", choices=["stop", "skip"],
                   help="on a NaN / Inf step: skip (count it and go on) or stop (after --nan-max-consecutive such "
                        "steps in a row, save the last good state to --save and exit with code 3)")
    g.add_argument("--nan-max-consecutive", type=int, default=1,
                   help="--nan-policy stop: NaN / Inf steps in a row that stop the run (the earlier ones are skipped)")
    g.add_argument("--nan-trace-modules", action="store_true",
                   help="forward hooks on every module: name the first module whose output is non-finite (a device "
                        "sync per module: for diagnosis)")
    g.add_argument("--loss-spike-factor", type=float, default=None,
                   help="report an lm loss above this factor times the mean of the last --loss-spike-window losses")
    g.add_argument("--loss-spike-window", type=int, default=50)
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-repeatable runs: torch deterministic algorithms plus the platform's settings "
                        "(CUBLAS_WORKSPACE_CONFIG, NCCL_ALGO=Ring / HCCL_DETERMINISTIC ...; platform/npu.py, cuda.py)")
    g.add_argument("--watchdog-timeout-minutes", type=float, default=None,
                   help="report a step (with its eval / save) that runs longer: which rank waits in which collective "
                        "and which never joined; then exit with code 4 so torchrun --max-restarts restarts the job")


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", help="constant | linear | cosine | WSD")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default=None, help="SentencePieceTokenizer | HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--mock-data", action="store_true", help="random tokens (smoke tests, benchmarks)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")


def build_parser(prog: str = "megatron_ascend", description: str = "", extra_args=None) -> argparse.ArgumentParser:
    """Our flags, then ``extra_args(p)``, then the foreign flags of arguments_compat (docs/MIGRATING.md)."""
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    _add_parallel_args(p)
    _add_training_args(p)
    _add_optimizer_args(p)
    _add_data_args(p)
    if extra_args is not None:
        extra_args(p)
    compat.add_train_flags(p)
    return p


def parser_defaults(p: argparse.ArgumentParser) -> dict:
    return {a.dest: a.default for a in p._actions}


def parse_args(argv: Optional[List[str]] = None, prog: str = "megatron_ascend", description: str = "",
               extra_args=None) -> argparse.Namespace:
    """Parse and resolve the foreign flags (ConfigError for a refused flag or a contradicting value)."""
    p = build_parser(prog, description, extra_args)
    args = p.parse_args(argv)
    compat.resolve(args, parser_defaults(p))
    return args


def _resolved(args: argparse.Namespace) -> compat.Resolved:
    """Namespaces built without parse_args (tools that extend the parser) are resolved here."""
    res = getattr(args, "compat_resolved", None)
    return res if res is not None else compat.resolve(args, parser_defaults(build_parser()))


# Megatron-LM's defaults for what a Megatron-style model description (--multi-latent-attention) leaves out
MEGATRON_MODEL_DEFAULTS = dict(
    q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=2, n_group=1, topk_group=1, scoring_func="softmax",
    routed_scaling_factor=1.0, first_k_dense_replace=0, moe_layer_freq=1, aux_loss_alpha=0.0,
    moe_router_load_balancing_type="aux_loss", rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=True, num_nextn_predict_layers=0, mtp_loss_scaling_factor=0.1, init_method_std=0.02)


def _megatron_routing(args, merged: dict, over: dict, res: compat.Resolved) -> None:
    """Megatron / MindSpeed router flags -> (topk_method, norm_topk_prob, balance loss), for what the command
    line did not say with our own flags. Raises where our DeepSeek routers cannot compute Megatron's."""
    given = res.given
    lb = getattr(args, "compat_balance_type", None)
    if lb == "pai_megatron_aux_loss":  # MindSpeed: softmax over all experts, greedy top-k, switch balance loss
        for fld, v in (("scoring_func", "softmax"), ("topk_method", "greedy"), ("norm_topk_prob", False)):
            if fld in over and over[fld] != v:
                raise ConfigError(f"--moe-router-load-balancing-type pai_megatron_aux_loss routes with softmax, "
                                  f"greedy top-k, no normalisation; it contradicts {fld} {over[fld]!r}")
            over[fld] = v
        over["moe_router_load_balancing_type"] = "aux_loss"
        return
    if lb is not None:
        if lb in ("noaux_tc", "group_limited_greedy"):  # MindSpeed's router names given as the balance type
            over.setdefault("topk_method", lb)
            lb = "none"
        over["moe_router_load_balancing_type"] = "seq_aux_loss" if (lb == "none" and "--seq-aux" in given) else lb
    elif "--seq-aux" in given:
        over["moe_router_load_balancing_type"] = "seq_aux_loss"
    bias = "--moe-router-enable-expert-bias" in given
    if bias:
        if over.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ConfigError(f"--moe-router-enable-expert-bias means --moe-router-topk-method noaux_tc, not "
                              f"{over['topk_method']}; drop one")
        over["topk_method"] = "noaux_tc"
    pre_softmax = "--moe-router-pre-softmax" in given
    if args.model_config:  # the config file holds the routing; only what the flags say explicitly changes it
        if pre_softmax:
            over.setdefault("norm_topk_prob", False)
        return
    if not compat.megatron_style(args) and not bias and not pre_softmax:
        return
    m = {**merged, **over}
    n_group = m.get("n_group", 1) or 1
    if "topk_method" not in over:
        over["topk_method"] = "noaux_tc" if bias else ("group_limited_greedy" if n_group > 1 else "greedy")
    if "norm_topk_prob" not in over:
        over["norm_topk_prob"] = (not pre_softmax) if m.get("scoring_func") == "softmax" else True
    method, k = over["topk_method"], m.get("num_experts_per_tok", 1)
    scaling = m.get("routed_scaling_factor", 1.0)
    if method in ("greedy", "group_limited_greedy") and over["norm_topk_prob"] and k > 1 and scaling != 1.0:
        raise ConfigError(f"--moe-router-topk-scaling-factor {scaling} with normalised {method} routing: "
                          f"Megatron-LM scales the normalised weights, DeepSeek-V2's router (ours) does not; use "
                          f"--moe-router-pre-softmax or a factor of 1")
    group_topk = m.get("topk_group", 1) or 1
    if n_group > 1 and method != "greedy":
        per = k // group_topk
        if (method == "noaux_tc" and per != 2) or (method == "group_limited_greedy" and per != 1):
            raise ConfigError(f"Megatron-LM scores an expert group by its top-{per} experts (topk {k} // "
                              f"group-topk {group_topk}); our {method} router uses the top-"
                              f"{2 if method == 'noaux_tc' else 1}; give --moe-router-topk-method explicitly or "
                              f"a matching --moe-router-group-topk")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    res = _resolved(args)
    model_type = args.model_type
    base = family_defaults(model_type if model_type else None)
    if args.model_config:
        base = ModelConfig.from_json_file(args.model_config).__dict__.copy()
        if model_type and model_type != base["model_type"]:
            raise ConfigError(f"--model-type {model_type} disagrees with --model-config's model_type "
                              f"{base['model_type']}; drop --model-type")
    elif compat.megatron_style(args):
        base.update(MEGATRON_MODEL_DEFAULTS)
        if getattr(args, "hidden_size", None) and getattr(args, "ffn_hidden_size", None) is None:
            base["intermediate_size"] = 4 * args.hidden_size
        if getattr(args, "seq_length", None) and getattr(args, "max_position_embeddings", None) is None:
            base["max_position_embeddings"] = args.seq_length
    over = {}
    for flag, fld in _MODEL_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            over[fld] = v
    if "moe_layer_freq" in over:
        try:
            over["moe_layer_freq"] = compat.parse_moe_layer_freq(over["moe_layer_freq"])
        except argparse.ArgumentTypeError as e:
            raise ConfigError(str(e))
    if isinstance(over.get("moe_layer_freq"), list):
        first, freq = compat.moe_pattern_to_ours(over["moe_layer_freq"], over.get("num_hidden_layers",
                                                                                  base.get("num_hidden_layers")))
        if "first_k_dense_replace" in over and over["first_k_dense_replace"] != first:
            raise ConfigError(f"--moe-layer-freq starts MoE at layer {first} but --first-k-dense-replace is "
                              f"{over['first_k_dense_replace']}; give one")
        over["first_k_dense_replace"], over["moe_layer_freq"] = first, freq
    if compat.megatron_style(args) and not args.model_config and "moe_intermediate_size" not in over:
        base["moe_intermediate_size"] = over.get("intermediate_size", base.get("intermediate_size"))
    if args.norm_topk_prob is not None:
        over["norm_topk_prob"] = args.norm_topk_prob
    if args.untie_embeddings_and_output_weights:
        over["tie_word_embeddings"] = False
    if getattr(args, "compat_indexer_loss_coeff", None) is not None:
        over["dsa_indexer_loss_coeff"] = args.compat_indexer_loss_coeff
    _megatron_routing(args, base, over, res)
    if compat.megatron_style(args) and not args.model_type and not args.model_config:
        # Megatron-LM has no model type: the routing says the family (HF export names its architecture)
        m = {**base, **over}
        over["model_type"] = ("deepseek_v32" if m.get("index_topk") else
                              "deepseek_v3" if m.get("topk_method") == "noaux_tc" else "deepseek_v2")
    if args.n_shared_experts is not None:
        over["n_shared_experts"] = args.n_shared_experts
    elif args.moe_shared_expert_intermediate_size is not None:
        width = over.get("moe_intermediate_size", base.get("moe_intermediate_size"))
        if not width or args.moe_shared_expert_intermediate_size % width:
            raise ConfigError(f"--moe-shared-expert-intermediate-size {args.moe_shared_expert_intermediate_size} "
                              f"is not a multiple of --moe-ffn-hidden-size {width}; give a multiple")
        over["n_shared_experts"] = args.moe_shared_expert_intermediate_size // width
    yarn_keys = ("rope_scaling_factor", "rope_scaling_original_max_position_embeddings", "rope_scaling_mscale",
                 "rope_scaling_mscale_all_dim", "rope_scaling_beta_fast", "rope_scaling_beta_slow")
    if args.rope_scaling_factor is None and any(getattr(args, k, None) is not None for k in yarn_keys) \
            and base.get("rope_scaling") is None:
        raise ConfigError("YaRN settings are given without --rope-scaling-factor (or Megatron's "
                          "--rotary-scaling-factor); give the factor or drop them")
    if args.rope_scaling_factor is not None or (base.get("rope_scaling") is not None and any(
            getattr(args, k, None) is not None for k in yarn_keys)):
        rs = base.get("rope_scaling") or RopeScaling()
        rs = RopeScaling(**rs) if isinstance(rs, dict) else rs
        kw = dict(rs.__dict__)
        if args.rope_scaling_factor is not None:
            kw["factor"] = args.rope_scaling_factor
        for key, fld in (("rope_scaling_beta_fast", "beta_fast"), ("rope_scaling_beta_slow", "beta_slow")):
            if getattr(args, key, None) is not None:
                kw[fld] = getattr(args, key)
        if args.rope_scaling_original_max_position_embeddings is not None:
            kw["original_max_position_embeddings"] = args.rope_scaling_original_max_position_embeddings
        if args.rope_scaling_mscale is not None:
            kw["mscale"] = args.rope_scaling_mscale
        if args.rope_scaling_mscale_all_dim is not None:
            kw["mscale_all_dim"] = args.rope_scaling_mscale_all_dim
        over["rope_scaling"] = RopeScaling(**kw)
    merged = {**base, **over}
    return ModelConfig(**merged)


def _schedule_lengths(args, gbs: int):
    """(train_iters, lr_warmup_iters, lr_decay_iters) from the iteration- or sample-based flags (Megatron's
    rules). Samples become iterations of ``gbs`` samples, as floats: Megatron's schedule in samples at a
    constant global batch is the iteration schedule with warm-up / decay lengths divided by the batch."""
    train_samples = getattr(args, "train_samples", None)
    warm_s, decay_s = getattr(args, "lr_warmup_samples", None), getattr(args, "lr_decay_samples", None)
    fraction = getattr(args, "lr_warmup_fraction", None)
    warm, decay, iters = args.lr_warmup_iters, args.lr_decay_iters, args.train_iters
    if train_samples is not None:
        if iters is not None:
            raise ConfigError(f"--train-samples {train_samples} and --train-iters {iters} are both given; "
                              f"training is counted in iterations or in samples, give one")
        if warm or decay is not None:
            raise ConfigError("--train-samples counts the LR schedule in samples: use --lr-warmup-samples / "
                              "--lr-decay-samples (or --lr-warmup-fraction), not --lr-warmup-iters / "
                              "--lr-decay-iters")
        iters = train_samples // gbs
        if iters < 1:
            raise ConfigError(f"--train-samples {train_samples} is less than one global batch of {gbs}")
        warm = (warm_s or 0) / gbs
        decay = decay_s / gbs if decay_s is not None else None
    elif warm_s is not None or decay_s is not None:
        raise ConfigError("--lr-warmup-samples / --lr-decay-samples need --train-samples (the schedule is counted "
                          "in iterations otherwise: use --lr-warmup-iters / --lr-decay-iters)")
    if fraction is not None:
        if warm or warm_s:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples are both given; "
                              "give one")
        warm = fraction * (decay if decay is not None else (iters or 0))
    return iters or 0, warm, decay


def build_configs(args: argparse.Namespace, world_size: int
                  ) -> Tuple[ModelConfig, ParallelConfig, OptimizerConfig, TrainingConfig, DataConfig]:
    _resolved(args)
    model = model_config_from_args(args)
    padded = getattr(args, "compat_padded_vocab_size", None)
    if padded is not None:
        if args.vocab_size is not None and args.vocab_size > padded:
            raise ConfigError(f"--vocab-size {args.vocab_size} exceeds --padded-vocab-size {padded}; the padded size "
                              f"must hold the vocabulary")
        args.vocab_size = padded
        model = ModelConfig(**{**model.__dict__, "vocab_size": padded})
    par = ParallelConfig(
        world_size=world_size, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size, sequence_parallel=args.sequence_parallel,
        use_distributed_optimizer=args.use_distributed_optimizer,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout, num_layer_list=args.num_layer_list,
        noop_layers=args.noop_layers, microbatch_group_size_per_vp_stage=args.microbatch_group_size_per_vp_stage)
    if par.noop_layers and args.num_layers is not None:  # --num-layers counts the noop slots (MindSpeed)
        real = args.num_layers - len(par.noop_layers)
        if real < 1:
            raise ConfigError(f"--noop-layers lists {len(par.noop_layers)} of the {args.num_layers} --num-layers; "
                              f"keep at least one real layer")
        model = dataclasses.replace(model, num_hidden_layers=real)
    gbs = args.global_batch_size or args.micro_batch_size * par.dp
    train_iters, warmup, decay = _schedule_lengths(args, gbs)
    opt = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=warmup, lr_decay_iters=decay, lr_warmup_init=getattr(args, "lr_warmup_init", None) or 0.0,
        lr_wsd_decay_iters=args.lr_wsd_decay_iters, lr_wsd_decay_style=args.lr_wsd_decay_style,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, bf16=args.bf16, fp16=args.fp16,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        overlap_grad_reduce=args.overlap_grad_reduce, gradient_accumulation_fusion=args.gradient_accumulation_fusion)
    train = TrainingConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length or min(4096, model.max_position_embeddings), train_iters=train_iters,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.log_interval,
        save_interval=args.save_interval, save=args.save, load=args.load, save_retain=args.save_retain,
        finetune=args.finetune, no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
        exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins, seed=args.seed,
        tensorboard_dir=args.tensorboard_dir, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        recompute_modules=tuple(args.recompute_modules or ()), peak_tflops=args.peak_tflops,
        ckpt_verify=args.ckpt_verify, ckpt_fallback=args.ckpt_fallback,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad, nan_policy=args.nan_policy,
        nan_max_consecutive=args.nan_max_consecutive, nan_trace_modules=args.nan_trace_modules,
        loss_spike_factor=args.loss_spike_factor, loss_spike_window=args.loss_spike_window,
        watchdog_timeout_minutes=args.watchdog_timeout_minutes,
        train_samples=getattr(args, "train_samples", None), save_optim=not getattr(args, "no_save_optim", False),
        save_rng=not getattr(args, "no_save_rng", False), async_save=bool(getattr(args, "async_save", False)))
    data = DataConfig(
        data_path=tuple(args.data_path), split=args.split, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        mock_data=args.mock_data, num_workers=args.num_workers, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=bool(getattr(args, "eod_mask_loss", False)),
        data_cache_path=getattr(args, "data_cache_path", None))
    validate_all(model, par, train, opt, data)
    return model, par, opt, train, data


def exit_on_config_error(fn):
    """Decorator for CLI mains: a ConfigError becomes one line on stderr and exit code 2 (no traceback)."""
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
