"""Megatron-LM and MindSpeed-LLM flags that are not ours: one table, each flag in one of three classes.

Owns the table (``TRAIN_FLAGS`` for ``megatron_ascend.pretrain`` / ``posttrain``, ``VALUE_SPELLINGS`` for
foreign values of our own flags, ``PREPROCESS_FLAGS`` / ``CONVERT_FLAGS`` for tools/preprocess_data.py and
tools/convert_ckpt.py), adding the training flags to a parser (``add_train_flags``), turning what a command
line gave into our settings (``resolve``), the start-up line, and docs/MIGRATING.md (``write_migrating``,
``python -m megatron_ascend.arguments_compat --write docs/MIGRATING.md``).

The classes:

- ``alias``: means what one of our settings means (a rename, another unit, another spelling); ``resolve``
  writes our setting, and a flag given both ways with different values is an error.
- ``no-effect``: accepted because it selects what we always do, or a kernel / memory / schedule choice that
  does not change results (or is not built yet: the table says what runs instead). Named in one start-up
  line. A value that contradicts what we do (``--normalization LayerNorm``) is an error.
- ``refused``: one error naming the flag and the nearest supported option.

Flags our parser defines (arguments.py) are ours and are not here. Nothing is dropped silently: a flag in
neither place is rejected by argparse.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError

ALIAS, NO_EFFECT, REFUSED = "alias", "no-effect", "refused"
MEGATRON, MINDSPEED, BOTH = "Megatron-LM", "MindSpeed-LLM", "both"

# no-effect groups, in the order the start-up line names them
ALWAYS = "selects what we always do"
KERNEL = "kernel choice, same results (the platform's fused-kernel table picks kernels)"
NOT_BUILT = "not built yet, same results (what runs instead is named)"
LOGGING = "logging / bookkeeping"
GROUPS = (ALWAYS, KERNEL, NOT_BUILT, LOGGING)


@dataclass(frozen=True)
class Flag:
    """One foreign flag. ``arg``: 'switch' (no value), 'value' (one), 'values' (one or more)."""

    names: Tuple[str, ...]
    kind: str
    means: str  # alias: ours and how; no-effect: what it selects here + memory / speed; refused: why
    arg: str = "switch"
    origin: str = BOTH
    group: str = ""  # no-effect only: one of GROUPS
    instead: str = ""  # no-effect NOT_BUILT: what runs instead; refused: the nearest supported option
    allowed: Optional[Tuple[str, ...]] = None  # no-effect with a value: the values that agree with us
    apply: Optional[Callable] = None  # alias: apply(ns, value, ctx) writes our settings

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def dest(self) -> str:
        return "compat_" + self.name.lstrip("-").replace("-", "_")


@dataclass
class Resolved:
    """What ``resolve`` found: the flags accepted without effect (with their values) and notes to print."""

    no_effect: List[Tuple[Flag, object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    given: Dict[str, object] = field(default_factory=dict)  # foreign flag name -> value, for later rules

    def startup_lines(self) -> List[str]:
        lines = []
        if self.no_effect:
            parts = []
            for group in GROUPS:
                flags = [(f, v) for f, v in self.no_effect if f.group == group]
                if not flags:
                    continue
                if group == NOT_BUILT:
                    names = "; ".join(f"{f.name} ({f.instead})" for f, _ in flags)
                else:
                    names = " ".join(f.name for f, _ in flags)
                parts.append(f"{group}: {names}")
            lines.append("accepted, no effect here: " + " | ".join(parts) + " (docs/MIGRATING.md)")
        lines += [f"note: {n}" for n in self.notes]
        return lines


# ------------------------------------------------------------------------------------------------------
# alias actions: each writes our namespace attribute(s) from the foreign value
# ------------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, ns, defaults: Dict[str, object], given: Dict[str, object]):
        self.ns, self.defaults, self.given, self.notes = ns, defaults, given, []

    def user_set(self, dest: str) -> bool:
        return getattr(self.ns, dest, None) != self.defaults.get(dest, None)

    def set(self, dest: str, value, foreign: str, ours: str) -> None:
        """Write ours unless it was given too; given with another value is an error."""
        if self.user_set(dest) and getattr(self.ns, dest) != value:
            raise ConfigError(f"{foreign} and {ours} are both given with different values "
                              f"({value!r} vs {getattr(self.ns, dest)!r}); they mean the same, give one")
        setattr(self.ns, dest, value)


def _rename(dest: str, ours: str, convert: Callable = lambda v: v) -> Callable:
    def apply(ns, value, ctx: _Ctx, flag: Flag):
        ctx.set(dest, convert(value), flag.name, ours)
    return apply


def _store(dest: str, convert: Callable = lambda v: v) -> Callable:
    """A setting that only the foreign flag gives (read by build_configs / the trainer)."""
    def apply(ns, value, ctx, flag):
        setattr(ns, dest, convert(value))
    return apply


def _positive_int(name: str) -> Callable:
    def conv(v):
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} {v!r} is not an integer; give a positive integer")
        if n <= 0:
            raise ConfigError(f"{name} {n} must be > 0")
        return n
    return conv


def _number(name: str, lo: float = 0.0, hi: Optional[float] = None) -> Callable:
    def conv(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} {v!r} is not a number")
        if x < lo or (hi is not None and x > hi):
            raise ConfigError(f"{name} {x} must be in [{lo}, {hi if hi is not None else 'inf'}]")
        return x
    return conv


def _local_rank(ns, value, ctx, flag):
    rank = _positive_int(flag.name)(int(value) + 1) - 1
    env = os.environ.get("LOCAL_RANK")
    if env is not None and int(env) != rank:
        raise ConfigError(f"{flag.name} {rank} disagrees with the LOCAL_RANK environment variable {env}; "
                          f"launch with torchrun (which sets LOCAL_RANK) and drop {flag.name}")
    os.environ["LOCAL_RANK"] = str(rank)


MODEL_TYPE_HF = {"deepseek2": "deepseek_v2", "deepseek2-lite": "deepseek_v2", "deepseek3": "deepseek_v3",
                 "deepseek32": "deepseek_v32", "deepseek4": "deepseek_v4"}


def _model_type_hf(ns, value, ctx, flag):
    if value not in MODEL_TYPE_HF:
        raise ConfigError(f"--model-type-hf {value!r} is not a DeepSeek model we train; use one of "
                          f"{', '.join(MODEL_TYPE_HF)} (or --model-type / --model-config)")
    ctx.set("model_type", MODEL_TYPE_HF[value], "--model-type-hf", "--model-type")


def _load_balancing(ns, value, ctx, flag):
    vals = value if isinstance(value, list) else [value]
    if len(vals) != 1:
        raise ConfigError(f"--moe-router-load-balancing-type {' '.join(vals)}: one balance loss per router here; "
                          f"use one of seq_aux_loss, aux_loss, none")
    v = vals[0]
    if v in ("sinkhorn", "global_aux_loss", "quantile_balancing", "sparsemixer_topk", "softmax_topk"):
        raise ConfigError(f"--moe-router-load-balancing-type {v} is not built; the nearest are seq_aux_loss "
                          f"(DeepSeek's per-sequence loss), aux_loss (per micro-batch) or none with the "
                          f"aux-loss-free expert bias (--moe-router-enable-expert-bias)")
    if v not in ("aux_loss", "seq_aux_loss", "none", "pai_megatron_aux_loss", "noaux_tc", "group_limited_greedy"):
        raise ConfigError(f"--moe-router-load-balancing-type {v!r} is unknown; use seq_aux_loss, aux_loss or none")
    ns.compat_balance_type = v


def _yarn_type(ns, value, ctx, flag):
    if value != "yarn":
        raise ConfigError(f"--rope-scaling-type {value!r} is not supported; YaRN ('yarn', with "
                          f"--rope-scaling-factor) or plain RoPE (no --rope-scaling-factor) are")


def _dsa_indexer(ns, value, ctx, flag):
    # MindSpeed-LLM's defaults for the V3.2 lightning indexer when the script names only its top-k
    for dest, default in (("index_n_heads", 64), ("index_head_dim", 128)):
        if getattr(ns, dest, None) is None:
            setattr(ns, dest, default)
    if getattr(ns, "index_topk", None) is None:
        ns.index_topk = 2048
    if not ctx.user_set("model_type"):
        ns.model_type = "deepseek_v32"


def _hf2mg(ns, value, ctx, flag):
    ns.convert_hf_at_load = True


def _recorded(ns, value, ctx, flag):
    """Nothing to write now: the flag's presence (Resolved.given) is read by arguments.model_config_from_args."""


# ------------------------------------------------------------------------------------------------------
# the training table (pretrain / posttrain)
# ------------------------------------------------------------------------------------------------------
def _a(names, means, apply=None, arg="switch", origin=BOTH):
    return Flag(tuple(names) if isinstance(names, (list, tuple)) else (names,), ALIAS, means, arg, origin,
                apply=apply)


def _n(names, group, means, arg="switch", origin=BOTH, instead="", allowed=None):
    return Flag(tuple(names) if isinstance(names, (list, tuple)) else (names,), NO_EFFECT, means, arg, origin,
                group=group, instead=instead, allowed=allowed)


def _r(names, means, nearest, arg="switch", origin=BOTH):
    return Flag(tuple(names) if isinstance(names, (list, tuple)) else (names,), REFUSED, means, arg, origin,
                instead=nearest)


V4_NEAREST = ("--model-config with DeepSeek-V4's config.json (the V4 architecture is read from it, not from "
              "flags)")
LORA_NEAREST = "full-parameter fine-tuning: python -m megatron_ascend.posttrain without the LoRA flags"

TRAIN_FLAGS: List[Flag] = [
    # ---- aliases: renames, other units, launcher plumbing --------------------------------------------
    _a("--tokenizer-name-or-path", "--tokenizer-model (the HF tokenizer directory)",
       _rename("tokenizer_model", "--tokenizer-model"), "value", MINDSPEED),
    _a("--padded-vocab-size", "--vocab-size: the model's embedding / output rows (MindSpeed's --vocab-size, "
       "given with it, is the unpadded size and must not exceed it)", _store("compat_padded_vocab_size",
                                                                             _positive_int("--padded-vocab-size")),
       "value", MINDSPEED),
    _a(("--local-rank", "--local_rank"), "the LOCAL_RANK environment variable (python -m torch.distributed.launch "
       "passes it; torchrun sets LOCAL_RANK): set from it when absent, an error when it disagrees",
       _local_rank, "value"),
    _a("--distributed-timeout-minutes", "the process-group timeout (platform.init_distributed); default 30",
       _store("distributed_timeout_minutes", _number("--distributed-timeout-minutes", 1e-3)), "value"),
    _a("--model-type-hf", "--model-type: deepseek2 / deepseek2-lite -> deepseek_v2 (V2-Lite defaults), "
       "deepseek3 -> deepseek_v3, deepseek32 -> deepseek_v32, deepseek4 -> deepseek_v4", _model_type_hf,
       "value", MINDSPEED),
    _a("--enable-hf2mg-convert", "--load is a HuggingFace directory: converted once at start-up to "
       "LOAD/megatron_ascend_hf2ma (tools/convert_ckpt.py's conversion) and loaded from there, weights only",
       _hf2mg, origin=MINDSPEED),
    _a("--multi-latent-attention", "MLA (always on); it also says the model is described Megatron-style: "
       "what the flags leave out takes Megatron-LM's defaults (no query LoRA without --q-lora-rank, softmax "
       "routing without expert bias, 1.0 top-k scaling, tied embeddings without "
       "--untie-embeddings-and-output-weights, norm epsilon 1e-5, init std 0.02)", _recorded),
    # training length and LR schedule in samples
    _a("--train-samples", "--train-iters = train-samples // global batch (Megatron's rule); the LR schedule is "
       "then counted in samples", _store("train_samples", _positive_int("--train-samples")), "value", MEGATRON),
    _a("--lr-warmup-samples", "--lr-warmup-iters in samples (needs --train-samples)",
       _store("lr_warmup_samples", _number("--lr-warmup-samples")), "value", MEGATRON),
    _a("--lr-decay-samples", "--lr-decay-iters in samples (needs --train-samples)",
       _store("lr_decay_samples", _number("--lr-decay-samples")), "value", MEGATRON),
    _a("--lr-warmup-fraction", "--lr-warmup-iters = fraction x the decay length (instead of "
       "--lr-warmup-iters / --lr-warmup-samples)",
       _store("lr_warmup_fraction", _number("--lr-warmup-fraction", 0, 1)), "value", MEGATRON),
    _a("--lr-warmup-init", "the learning rate at the start of warm-up (default 0): lr = init + (lr - init) x "
       "step / warm-up", _store("lr_warmup_init", _number("--lr-warmup-init")), "value", MEGATRON),
    # checkpoints and data
    _a("--no-save-optim", "checkpoints without the optimizer state (load them with --no-load-optim or "
       "--finetune)", _store("no_save_optim", bool)),
    _a("--no-save-rng", "checkpoints without the RNG states", _store("no_save_rng", bool)),
    _a("--async-save", "checkpoints written by a background thread after a device-to-host copy "
       "(checkpointing's async_save); the run waits for it before the next save and at exit",
       _store("async_save", bool), origin=MEGATRON),
    _a("--data-cache-path", "where the dataset index caches go (default: next to the data)",
       _store("data_cache_path"), "value"),
    _a("--eod-mask-loss", "no loss on the end-of-document token's prediction (loss mask 0 where the input is "
       "eod)", _store("eod_mask_loss", bool), origin=MEGATRON),
    # model: other names / units of ours
    _a("--rotary-scaling-factor", "--rope-scaling-factor (YaRN)", _rename("rope_scaling_factor",
                                                                          "--rope-scaling-factor", float),
       "value", MEGATRON),
    _a("--mscale", "--rope-scaling-mscale", _rename("rope_scaling_mscale", "--rope-scaling-mscale", float),
       "value", MEGATRON),
    _a("--mscale-all-dim", "--rope-scaling-mscale-all-dim",
       _rename("rope_scaling_mscale_all_dim", "--rope-scaling-mscale-all-dim", float), "value", MEGATRON),
    _a("--beta-fast", "YaRN beta_fast (default 32)", _store("rope_scaling_beta_fast", float), "value", MINDSPEED),
    _a("--beta-slow", "YaRN beta_slow (default 1)", _store("rope_scaling_beta_slow", float), "value", MINDSPEED),
    _a("--rope-scaling-type", "YaRN: 'yarn' is the only scaling (enabled by --rope-scaling-factor); another "
       "value is an error", _yarn_type, "value", MINDSPEED),
    _a("--moe-router-load-balancing-type", "the balance loss: seq_aux_loss, aux_loss, none; MindSpeed's "
       "'none' with --seq-aux is seq_aux_loss, its 'pai_megatron_aux_loss' is aux_loss with V2's softmax "
       "greedy routing (pre-softmax, no normalisation)", _load_balancing, "values"),
    _a("--seq-aux", "the balance loss is computed per sequence (seq_aux_loss)", _recorded, origin=MINDSPEED),
    _a("--moe-router-enable-expert-bias", "--moe-router-topk-method noaux_tc (the aux-loss-free expert bias, "
       "updated at --moe-router-bias-update-rate)", _recorded),
    _a("--moe-router-pre-softmax", "--no-norm-topk-prob with softmax scoring (softmax over all experts, then "
       "top-k, not renormalised)", _recorded, origin=MEGATRON),
    _a("--enable-dsa-indexer", "the DeepSeek-V3.2 lightning indexer (--index-topk; MindSpeed's defaults "
       "--index-n-heads 64 --index-head-dim 128 --index-topk 2048; model type deepseek_v32)", _dsa_indexer,
       origin=MINDSPEED),
    _a("--indexer-loss-coeff", "the DSA indexer's KL loss coefficient (dsa_indexer_loss_coeff)",
       _store("compat_indexer_loss_coeff", _number("--indexer-loss-coeff")), "value", MINDSPEED),
    _a("--position-embedding-type", "'rope' (what we do); MindSpeed's 'deepseek4' selects DeepSeek-V4; other "
       "values (learned_absolute, none, mrope, ...) are errors", _recorded, "value"),

    # ---- accepted, no effect: what we always do ----------------------------------------------------------
    _n("--use-mcore-models", ALWAYS, "Megatron-Core model classes: ours are the only models"),
    _n("--swiglu", ALWAYS, "SwiGLU MLPs (DeepSeek's)"),
    _n("--disable-bias-linear", ALWAYS, "no biases in linear layers (DeepSeek's)"),
    _n("--normalization", ALWAYS, "RMSNorm (DeepSeek's); another value is an error", "value",
       allowed=("RMSNorm",)),
    _n("--use-rotary-position-embeddings", ALWAYS, "RoPE on the decoupled MLA dims"),
    _n("--qk-layernorm", ALWAYS, "MLA's RMSNorms on the query / key-value latents (always present)"),
    _n("--attention-softmax-in-fp32", ALWAYS, "the attention softmax runs in fp32"),
    _n("--moe-router-dtype", ALWAYS, "the router runs in fp32; another value is an error", "value",
       allowed=("fp32",)),
    _n("--hidden-dropout", ALWAYS, "no dropout (DeepSeek trains without); a non-zero value is an error", "value",
       allowed=("0", "0.0", "0.")),
    _n("--attention-dropout", ALWAYS, "no dropout; a non-zero value is an error", "value",
       allowed=("0", "0.0", "0.")),
    _n("--rotary-percent", ALWAYS, "RoPE on all decoupled dims; another value is an error", "value",
       allowed=("1", "1.0", "1.")),
    _n("--moe-token-drop-policy", ALWAYS, "with a capacity factor, the lowest-probability assignments are "
       "dropped ('probs'); 'position' is an error", "value", allowed=("probs",)),
    _n("--gemm-gradient-accumulation-fusion", ALWAYS, "weight gradients accumulate in the GEMM into main_grad "
       "(on by default; --no-gradient-accumulation-fusion turns it off)", origin=MINDSPEED),
    _n("--kv-channels", ALWAYS, "per-head width of non-MLA attention; Megatron-LM's MLA ignores it too (head "
       "sizes are --qk-head-dim / --qk-pos-emb-head-dim / --v-head-dim)", "value", MEGATRON),
    _n("--spec", ALWAYS, "MindSpeed's layer spec module: the DeepSeek decoder layer is ours", "values",
       MINDSPEED),
    _n("--mtp-spec", ALWAYS, "MindSpeed's MTP layer spec: the MTP module is ours", "values", MINDSPEED),
    _n("--transformer-impl", ALWAYS, "local / transformer_engine layers: ours are plain PyTorch + the platform's "
       "kernels", "value", allowed=("local", "transformer_engine")),
    _n("--ckpt-format", ALWAYS, "checkpoints are torch.distributed.checkpoint directories that load at any "
       "layout (like torch_dist)", "value", allowed=("torch", "torch_dist")),
    _n("--auto-detect-ckpt-format", ALWAYS, "one checkpoint format", origin=MEGATRON),
    _n("--dist-ckpt-strictness", ALWAYS, "how a load treats missing / unexpected tensors is fixed "
       "(docs/CHECKPOINTS.md)", "value", MEGATRON),
    _n("--no-create-attention-mask-in-dataloader", ALWAYS, "the loader never builds a mask tensor (causal "
       "masks are made in the model)", origin=MEGATRON),
    _n("--no-mmap-bin-files", ALWAYS, ".bin files are memory-mapped (host memory: page cache only)",
       origin=MEGATRON),
    _n("--tokenizer-not-use-fast", ALWAYS, "HF tokenizers are read from tokenizer.json with the tokenizers "
       "library (the fast tokenizer; same ids)", origin=MINDSPEED),
    _n("--handler-name", ALWAYS, "the record handler is chosen when preprocessing (tools/preprocess_data.py "
       "--handler-name)", "value", MINDSPEED),
    _n("--no-pad-to-seq-lengths", ALWAYS, "SFT samples are padded to --seq-length (or packed with "
       "--sft-packing): some compute on padding, same loss", origin=MINDSPEED),
    _n("--pad-to-multiple-of", ALWAYS, "SFT samples are padded to --seq-length", "value", MINDSPEED),
    _n("--enable-experimental", ALWAYS, "no experimental switches", origin=MEGATRON),
    _n("--distributed-backend", ALWAYS, "the platform picks hccl / nccl / gloo for the device", "value",
       allowed=("nccl", "hccl", "gloo")),
    _n("--no-shared-storage", ALWAYS, "each rank writes its own checkpoint shards; dataset index caches are "
       "built per node when the disk is not shared", origin=MINDSPEED),
    _n("--dataloader-type", ALWAYS, "samples are read once through the dataset's own shuffled order "
       "(Megatron's 'single'); 'cyclic' re-shuffles nothing more here", "value",
       allowed=("single", "cyclic")),
    _n("--max-batch-size", ALWAYS, "an inference setting (generation batch)", "value", MINDSPEED),
    _n("--context-parallel-algo", ALWAYS, "context parallelism is not built (--context-parallel-size must be 1)",
       "value", MINDSPEED),
    _n("--init-norm-weight-in-fp32", ALWAYS, "norm weights start at 1.0, exact in every dtype",
       origin=MINDSPEED),
    # kernels (same results)
    _n("--use-flash-attn", KERNEL, "fused attention"),
    _n("--use-fused-rmsnorm", KERNEL, "fused RMSNorm", origin=MINDSPEED),
    _n("--use-fused-swiglu", KERNEL, "fused SwiGLU", origin=MINDSPEED),
    _n("--use-fused-rotary-pos-emb", KERNEL, "fused RoPE", origin=MINDSPEED),
    _n("--no-rope-fusion", KERNEL, "unfused RoPE", origin=MEGATRON),
    _n("--no-bias-swiglu-fusion", KERNEL, "unfused SwiGLU", origin=MEGATRON),
    _n("--no-masked-softmax-fusion", KERNEL, "unfused masked softmax"),
    _n("--moe-grouped-gemm", KERNEL, "experts run as one grouped GEMM (always: the platform's grouped matmul "
       "or a loop over local experts)"),
    _n("--moe-permute-fusion", KERNEL, "fused token permutation"),
    _n("--moe-router-fusion", KERNEL, "fused router top-k", origin=MEGATRON),
    _n("--cross-entropy-loss-fusion", KERNEL, "fused cross-entropy", origin=MEGATRON),
    _n("--cross-entropy-fusion-impl", KERNEL, "fused cross-entropy implementation", "value", MEGATRON),
    _n("--mla-fa-without-pad", KERNEL, "MLA attention without padding v to the qk width", origin=MINDSPEED),
    _n("--mla-mm-split", KERNEL, "MLA up-projection GEMMs split per head part", origin=MINDSPEED),
    _n("--enable-mla-absorb", KERNEL, "MLA with the up-projections absorbed (the same products, reordered)",
       origin=MINDSPEED),
    _n("--use-fused-lightning-indexer", KERNEL, "fused V3.2 indexer scores", origin=MINDSPEED),
    _n("--use-fused-lightning-indexer-loss", KERNEL, "fused V3.2 indexer loss", origin=MINDSPEED),
    _n("--use-sparse-flash-attn", KERNEL, "fused sparse attention over the indexer's top-k", origin=MINDSPEED),
    _n("--use-ascend-coc", KERNEL, "Ascend compute-over-communication fusion of TP GEMMs", origin=MINDSPEED),
    _n("--coc-fused-kernel", KERNEL, "Ascend CoC fused kernel", origin=MINDSPEED),
    _n("--shape-order", KERNEL, "the attention kernel's layout (BNSD / BSND / SBH)", "value", MINDSPEED),
    # not built yet: what runs instead
    _n("--schedules-method", NOT_BUILT, "DualPipeV", "value", MINDSPEED,
       "1F1B, interleaved with --num-layers-per-virtual-pipeline-stage: a larger pipeline bubble"),
    _n("--moe-fb-overlap", NOT_BUILT, "overlap of one micro-batch's forward with another's backward",
       origin=MINDSPEED, instead="forward and backward one after the other: EP all-to-all not hidden"),
    _n("--moe-alltoall-overlap-comm", NOT_BUILT, "all-to-all overlapped with expert compute", origin=MINDSPEED,
       instead="all-to-all then experts: communication not hidden"),
    _n("--moe-permutation-async-comm", NOT_BUILT, "asynchronous permutation communication", origin=MINDSPEED,
       instead="synchronous all-to-all"),
    _n("--moe-shared-expert-overlap", NOT_BUILT, "shared experts overlapped with the dispatch",
       origin=MEGATRON, instead="shared experts computed after the dispatch"),
    _n("--overlap-param-gather", NOT_BUILT, "the distributed optimizer's all-gather overlapped with the next "
       "forward", origin=MEGATRON, instead="all-gather right after the optimizer step"),
    _n("--swap-optimizer", NOT_BUILT, "optimizer state swapped to host memory", origin=MINDSPEED,
       instead="optimizer state stays on the device: 12 bytes/param (/dp with the distributed optimizer) "
               "more device memory"),
    _n("--swap-optimizer-times", NOT_BUILT, "how many chunks --swap-optimizer moves at a time", "value",
       MINDSPEED, "no swapping"),
    _n("--reuse-fp32-param", NOT_BUILT, "bf16 params share the fp32 main params' memory", origin=MINDSPEED,
       instead="separate bf16 params and fp32 main params: 2 bytes/param more"),
    _n("--mtp-mem-efficient-logits", NOT_BUILT, "MTP logits computed in chunks", origin=MINDSPEED,
       instead="MTP logits computed whole: vocab x tokens more activation memory"),
    _n("--recompute-activation-function", NOT_BUILT, "recompute of the MLP activation", origin=MINDSPEED,
       instead="activations kept (nearest: --recompute-modules moe_act for the experts)"),
    _n("--manual-gc", NOT_BUILT, "Python's GC run by hand every --manual-gc-interval steps", origin=BOTH,
       instead="Python's automatic GC (rare pauses)"),
    _n("--manual-gc-interval", NOT_BUILT, "steps between manual GC runs", "value", BOTH, "automatic GC"),
    # logging
    _n("--log-throughput", LOGGING, "throughput is always logged"),
    _n("--log-timers-to-tensorboard", LOGGING, "per-phase timers are not logged (iteration time is)",
       origin=MEGATRON),
    _n("--log-memory-to-tensorboard", LOGGING, "memory is always logged", origin=MEGATRON),
    _n("--log-num-zeros-in-grad", LOGGING, "the number of zero grads is logged when the optimizer counts it",
       origin=MEGATRON),
    _n("--log-params-norm", LOGGING, "the parameter norm is not logged", origin=MEGATRON),
    _n("--log-validation-ppl-to-tensorboard", LOGGING, "validation perplexity is always logged",
       origin=MEGATRON),
    _n("--logging-level", LOGGING, "Python logging level", "value", MEGATRON),
    _n("--wandb-project", LOGGING, "Weights & Biases is not built: TensorBoard (--tensorboard-dir) only",
       "value", MEGATRON),
    _n("--wandb-exp-name", LOGGING, "Weights & Biases run name (not built)", "value", MEGATRON),

    # ---- refused ------------------------------------------------------------------------------------------
    _r("--lora-r", "LoRA is not built", LORA_NEAREST, "value", MINDSPEED),
    _r("--lora-alpha", "LoRA is not built", LORA_NEAREST, "value", MINDSPEED),
    _r("--lora-target-modules", "LoRA is not built", LORA_NEAREST, "values", MINDSPEED),
    _r("--lora-fusion", "LoRA is not built", LORA_NEAREST, origin=MINDSPEED),
    _r("--moe-tp-extend-ep", "experts split over TP ranks as extra EP is not built",
       "--expert-tensor-parallel-size 1 with a larger --expert-model-parallel-size", origin=MINDSPEED),
    _r("--enable-mhc", "DeepSeek-V4 architecture flags are not read from the command line", V4_NEAREST,
       origin=MINDSPEED),
    _r("--hc-mult", "DeepSeek-V4 mHC width", V4_NEAREST, "value", MINDSPEED),
    _r("--use-fused-mhc", "DeepSeek-V4 mHC kernel", V4_NEAREST, origin=MINDSPEED),
    _r("--use-triton-mhc", "DeepSeek-V4 mHC kernel", V4_NEAREST, origin=MINDSPEED),
    _r("--kv-compress", "DeepSeek-V4 compressed attention", V4_NEAREST, origin=MINDSPEED),
    _r("--compress-ratios", "DeepSeek-V4 compression ratios", V4_NEAREST, "values", MINDSPEED),
    _r("--compress-rope-theta", "DeepSeek-V4 compressed RoPE base", V4_NEAREST, "value", MINDSPEED),
    _r("--o-groups", "DeepSeek-V4 grouped output projection", V4_NEAREST, "value", MINDSPEED),
    _r("--o-lora-rank", "DeepSeek-V4 output LoRA", V4_NEAREST, "value", MINDSPEED),
    _r("--n-hash-layers", "DeepSeek-V4 hash-routed layers", V4_NEAREST, "value", MINDSPEED),
    _r("--sliding-window-size", "DeepSeek-V4 sliding window", V4_NEAREST, "value", MINDSPEED),
    _r("--swiglu-limit", "DeepSeek-V4 clamped SwiGLU", V4_NEAREST, "value", MINDSPEED),
    _r("--rope-factor", "DeepSeek-V4 RoPE factor", V4_NEAREST, "value", MINDSPEED),
    _r("--original-seq-len", "DeepSeek-V4 original context length", V4_NEAREST, "value", MINDSPEED),
]

# Foreign values of our own flags: (flag, value or pattern, ours, note)
VALUE_SPELLINGS: List[Tuple[str, str, str, str]] = [
    ("--tokenizer-type", "PretrainedFromHF", "HuggingFaceTokenizer", "MindSpeed-LLM's name for an HF tokenizer"),
    ("--moe-token-dispatcher-type", "alltoall_seq", "alltoall",
     "MindSpeed-LLM's sequence-split all-to-all: the same tokens reach the same experts"),
    ("--moe-token-dispatcher-type", "flex", "alltoall",
     "Megatron-LM's DeepEP / HybridEP dispatcher is not built: all-to-all over ep moves the same tokens"),
    ("--moe-layer-freq", "'([0]*K+[1]*N)' (a Python list expression)", "--first-k-dense-replace K "
     "--moe-layer-freq 1", "parsed without eval: a list of 0/1 per layer, or [0]*a+[1]*b sums of repeated "
     "lists; it must be expressible as K dense layers then MoE every F-th layer"),
]
TOKENIZER_TYPE_SPELLINGS = {"PretrainedFromHF": "HuggingFaceTokenizer"}
DISPATCHER_SPELLINGS = {"alltoall_seq": "alltoall", "flex": "alltoall"}

_BY_NAME: Dict[str, Flag] = {n: f for f in TRAIN_FLAGS for n in f.names}


def lookup(name: str) -> Optional[Flag]:
    return _BY_NAME.get(name)


# ------------------------------------------------------------------------------------------------------
# --moe-layer-freq in Megatron's list form, without eval
# ------------------------------------------------------------------------------------------------------
_LIST_TERM = re.compile(r"^\[\s*([01](?:\s*,\s*[01])*)\s*\](?:\s*\*\s*(\d+))?$")


def parse_moe_layer_freq(text) -> object:
    """An int, or Megatron's list expression (``([0]*3+[1]*58)``, ``[1,0,1,0]``) as a list of 0/1.

    Only list literals of 0 / 1, ``* N`` repetition and ``+`` concatenation are read; anything else is an
    error (never evaluated)."""
    s = str(text).strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    if s.startswith("(") and s.endswith(")"):
        s = s[1:-1].strip()
    out: List[int] = []
    for term in _split_plus(s):
        m = _LIST_TERM.match(term.strip())
        if not m:
            raise argparse.ArgumentTypeError(
                f"--moe-layer-freq {text!r} is neither an integer nor a list of 0/1 such as '([0]*3+[1]*58)'")
        items = [int(x) for x in m.group(1).split(",")]
        out += items * (int(m.group(2)) if m.group(2) else 1)
    return out


def _split_plus(s: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def moe_pattern_to_ours(pattern: Sequence[int], num_layers: Optional[int]) -> Tuple[int, int]:
    """A per-layer 0/1 list -> (first_k_dense_replace, moe_layer_freq), or ConfigError if ours cannot say it."""
    n = len(pattern)
    if num_layers is not None and n != num_layers:
        raise ConfigError(f"--moe-layer-freq lists {n} layers but --num-layers is {num_layers}; list one 0/1 per "
                          f"layer")
    if 1 not in pattern:
        raise ConfigError("--moe-layer-freq lists no MoE layer; use --num-experts 0 for a dense model")
    first = pattern.index(1)
    for freq in range(1, n + 1):
        want = [int(i >= first and i % freq == 0) for i in range(n)]
        if want == list(pattern):
            return first, freq
    raise ConfigError(f"--moe-layer-freq {pattern} cannot be said as K dense layers then a MoE layer every F-th "
                      f"layer (--first-k-dense-replace / --moe-layer-freq); use such a pattern")


# ------------------------------------------------------------------------------------------------------
# parser plumbing and resolution
# ------------------------------------------------------------------------------------------------------
def add_flags(p: argparse.ArgumentParser, flags: Sequence[Flag], title: str,
              kinds: Sequence[str] = (ALIAS, NO_EFFECT, REFUSED)) -> None:
    """Add ``flags`` (those of ``kinds`` that the parser does not define itself) to ``p``."""
    existing = set(p._option_string_actions)
    g = p.add_argument_group(title, "Foreign flags: aliases are listed; flags accepted without effect and "
                                    "refused flags are in docs/MIGRATING.md.")
    for f in flags:
        if f.kind not in kinds:
            continue
        names = [n for n in f.names if n not in existing]
        if not names:  # another helper made it ours: the parser's definition wins
            continue
        kw = dict(dest=f.dest, default=None, help=(f"{f.means}" if f.kind == ALIAS else argparse.SUPPRESS))
        if f.arg == "switch":
            g.add_argument(*names, action="store_true", **{**kw, "default": None})
        elif f.arg == "values":
            g.add_argument(*names, nargs="+", **kw)
        else:
            g.add_argument(*names, **kw)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p, TRAIN_FLAGS, "Megatron-LM / MindSpeed-LLM compatibility")


def add_tool_flags(p: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """A tool's accepted-without-effect and refused flags (its aliases are its own options)."""
    add_flags(p, flags, "MindSpeed-LLM compatibility", kinds=(NO_EFFECT, REFUSED))


def resolve_tool(ns: argparse.Namespace, flags: Sequence[Flag]) -> List[str]:
    """ConfigError for a refused flag given; returns the lines to print for flags accepted without effect."""
    seen = []
    for f in flags:
        if f.kind == ALIAS:
            continue
        value = getattr(ns, f.dest, None)
        if value is None:
            continue
        if f.kind == REFUSED:
            raise ConfigError(f"{f.name} is not supported ({f.means}); nearest: {f.instead}")
        _check_value(f, value)
        seen.append(f.name)
    return [f"accepted, no effect here: {' '.join(seen)} (docs/MIGRATING.md)"] if seen else []


def _check_value(f: Flag, value) -> None:
    vals = value if isinstance(value, list) else [value]
    if f.allowed is None:
        return
    for v in vals:
        if str(v) not in f.allowed:
            raise ConfigError(f"{f.name} {v} contradicts what megatron_ascend does ({f.means}); "
                              f"use {' or '.join(f.allowed)} or drop the flag")


def resolve(ns: argparse.Namespace, defaults: Dict[str, object]) -> Resolved:
    """Apply the foreign flags found in ``ns`` (from add_train_flags); returns what to print at start-up.

    Raises ConfigError for a refused flag or a value that contradicts what we do. Idempotent."""
    if getattr(ns, "compat_resolved", None) is not None:
        return ns.compat_resolved
    res = Resolved()
    ctx = _Ctx(ns, defaults, res.given)
    for f in TRAIN_FLAGS:
        value = getattr(ns, f.dest, None)
        if value is None:
            continue
        res.given[f.name] = value
        if f.kind == REFUSED:
            raise ConfigError(f"{f.name} is not supported ({f.means}); nearest: {f.instead}")
        if f.kind == NO_EFFECT:
            _check_value(f, value)
            res.no_effect.append((f, value))
            continue
        if f.apply is not None:
            f.apply(ns, value, ctx, f)
    _value_spellings(ns, res)
    _position_embedding(ns, res)
    if getattr(ns, "sequence_parallel", False) and getattr(ns, "tensor_model_parallel_size", 1) == 1:
        ns.sequence_parallel = False
        res.notes.append("--sequence-parallel turned off: it needs --tensor-model-parallel-size > 1 "
                         "(Megatron-LM does the same)")
    res.notes += ctx.notes
    ns.compat_resolved = res
    return res


def _value_spellings(ns, res: Resolved) -> None:
    t = getattr(ns, "tokenizer_type", None)
    if t in TOKENIZER_TYPE_SPELLINGS:
        ns.tokenizer_type = TOKENIZER_TYPE_SPELLINGS[t]
    d = getattr(ns, "moe_token_dispatcher_type", None)
    if d in DISPATCHER_SPELLINGS:
        ns.moe_token_dispatcher_type = DISPATCHER_SPELLINGS[d]


def _position_embedding(ns, res: Resolved) -> None:
    v = res.given.get("--position-embedding-type")
    if v is None or v == "rope":
        return
    if v == "deepseek4":
        if getattr(ns, "model_type", None) not in (None, "deepseek_v4"):
            raise ConfigError(f"--position-embedding-type deepseek4 selects DeepSeek-V4 but --model-type is "
                              f"{ns.model_type}; drop one")
        ns.model_type = "deepseek_v4"
        return
    raise ConfigError(f"--position-embedding-type {v} contradicts what megatron_ascend does (RoPE on MLA's "
                      f"decoupled dims); use rope or drop the flag")


def megatron_style(ns) -> bool:
    """The model is described Megatron-style (--multi-latent-attention): omitted fields take Megatron's
    defaults (see MEGATRON_MODEL_DEFAULTS in arguments.py)."""
    return bool(getattr(ns, "compat_multi_latent_attention", None))


def print_startup(res: Resolved, rank: Optional[int] = None, file=None) -> None:
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return
    for line in res.startup_lines():
        print(line, file=file or sys.stdout, flush=True)


# ------------------------------------------------------------------------------------------------------
# the tools' foreign flags (the tools parse them; listed here for docs/MIGRATING.md and its test)
# ------------------------------------------------------------------------------------------------------
PREPROCESS_FLAGS: List[Flag] = [
    _a("--tokenizer-name-or-path", "--tokenizer-model", arg="value", origin=MINDSPEED),
    _a("--handler-name", "GeneralPretrainHandler: pretraining documents (--json-keys); "
       "AlpacaStyleInstructionHandler / SharegptStyleInstructionHandler: --sft with --sft-format alpaca / "
       "sharegpt", arg="value", origin=MINDSPEED),
    _a("--map-keys", "renames record keys before reading them: alpaca {prompt, query, response, system, history}"
       " -> the columns; sharegpt {messages, system, tags: {role_tag, content_tag, user_tag, assistant_tag, "
       "system_tag}}", arg="value", origin=MINDSPEED),
    _a("--log-interval", "a progress line every N documents (instead of the progress bar)", arg="value",
       origin=MINDSPEED),
    _a("--prompt-type", "chat template: deepseek2 / deepseek2-lite (User: ... Assistant:), deepseek3 "
       "(<｜User｜>...<｜Assistant｜>); ours: deepseek, tokenizer, auto", arg="value", origin=MINDSPEED),
    _n("--overwrite-cache", ALWAYS, "no tokenization cache is kept: every run reads the input again",
       origin=MINDSPEED),
    _r("--enable-thinking", "DeepSeek-V4's thinking template is not built",
       "--prompt-type tokenizer (the tokenizer's own chat template)", "value", MINDSPEED),
]
PREPROCESS_HANDLERS = {"GeneralPretrainHandler": None, "AlpacaStyleInstructionHandler": "alpaca",
                       "SharegptStyleInstructionHandler": "sharegpt"}

CONVERT_FLAGS: List[Flag] = [
    _a("--load-model-type", "with --save-model-type: hf -> mg is --direction hf2ma, mg -> hf is ma2hf",
       arg="value", origin=MINDSPEED),
    _a("--save-model-type", "see --load-model-type", arg="value", origin=MINDSPEED),
    _a("--target-tensor-parallel-size", "--tensor-model-parallel-size", arg="value", origin=MINDSPEED),
    _a("--target-pipeline-parallel-size", "--pipeline-model-parallel-size", arg="value", origin=MINDSPEED),
    _a("--target-expert-parallel-size", "--expert-model-parallel-size", arg="value", origin=MINDSPEED),
    _a("--model-type-hf", "checked against the checkpoint's config.json model_type", arg="value",
       origin=MINDSPEED),
    _a("--num-layers", "checked against the checkpoint's layer count (MindSpeed's count includes "
       "--noop-layers)", arg="value", origin=MINDSPEED),
    _a("--mtp-num-layers", "checked against the checkpoint's MTP layers", arg="value", origin=MINDSPEED),
    _a("--first-k-dense-replace", "checked against the checkpoint's config.json", arg="value",
       origin=MINDSPEED),
    _a("--hf-cfg-dir", "--model-config DIR/config.json for ma2hf", arg="value", origin=MINDSPEED),
    _n(("--source-tensor-parallel-size", "--source-pipeline-parallel-size", "--source-expert-parallel-size"),
       ALWAYS, "our checkpoints store global tensors: the source layout is read from the checkpoint", "value",
       MINDSPEED),
    _n("--moe-grouped-gemm", ALWAYS, "experts are stored per expert in HF and grouped in ours, always",
       origin=MINDSPEED),
    _n("--mla-mm-split", ALWAYS, "the MLA up-projections are stored whole", origin=MINDSPEED),
    _n(("--noop-layers", "--num-layer-list"), ALWAYS, "layer placement is chosen at training time (our "
       "checkpoints load at any placement); with them the pipeline split is not checked here", "value",
       MINDSPEED),
    _n("--expert-tensor-parallel-size", ALWAYS, "chosen at training time", "value", MINDSPEED),
    _r("--moe-tp-extend-ep", "experts split over TP ranks as extra EP is not built",
       "--expert-tensor-parallel-size 1 at training time", origin=MINDSPEED),
    _r(("--lora-r", "--lora-alpha"), "LoRA is not built (nothing to merge)", "full-parameter checkpoints only",
       "value", MINDSPEED),
    _r(("--input_fp8_hf_path", "--output_hf_path", "--quant_type"), "MindSpeed's separate FP8 dequantiser",
       "--direction hf2ma dequantises FP8 / FP4 HF checkpoints itself (--save-dtype bf16)", "value", MINDSPEED),
]


# ------------------------------------------------------------------------------------------------------
# docs/MIGRATING.md
# ------------------------------------------------------------------------------------------------------
def _md(s: str) -> str:
    return s.replace("|", "\\|")


def _names(f: Flag) -> str:
    return ", ".join(f"`{n}`" for n in f.names)


def migrating_markdown() -> str:
    al = [f for f in TRAIN_FLAGS if f.kind == ALIAS]
    ne = [f for f in TRAIN_FLAGS if f.kind == NO_EFFECT]
    rf = [f for f in TRAIN_FLAGS if f.kind == REFUSED]
    out = [
        "# Moving a Megatron-LM or MindSpeed-LLM script over",
        "",
        "<!-- generated by `python -m megatron_ascend.arguments_compat --write docs/MIGRATING.md` from",
        "     megatron_ascend/arguments_compat.py; tests/test_arguments_compat.py fails when it is out of date -->",
        "",
        "Change the entry point and keep the flags:",
        "",
        "| was | becomes |",
        "|---|---|",
        "| `torchrun $DISTRIBUTED_ARGS pretrain_gpt.py ...` | "
        "`torchrun $DISTRIBUTED_ARGS -m megatron_ascend.pretrain ...` |",
        "| `python -m torch.distributed.launch $DISTRIBUTED_ARGS pretrain_gpt.py ...` | "
        "`python -m torch.distributed.launch $DISTRIBUTED_ARGS -m megatron_ascend.pretrain ...` |",
        "| `... posttrain_gpt.py ... --stage sft` | `... -m megatron_ascend.posttrain ... --stage sft` |",
        "| `python preprocess_data.py ...` | `python tools/preprocess_data.py ...` |",
        "| `python convert_ckpt.py ...` / `convert_ckpt_v2.py` / `convert_ckpt_deepseek3.py` | "
        "`python tools/convert_ckpt.py ...` |",
        "",
        "Every flag of the public DeepSeek scripts (MindSpeed-LLM examples/mcore/deepseek2_lite, deepseek3, "
        "deepseek32, deepseek4_flash; Megatron-LM's DeepSeek-V2-Lite and the DeepSeek-V3 recipes) is ours, an "
        "alias of ours, accepted without effect, or refused; the tables below list the last three. A flag in "
        "none of them is rejected by argparse: nothing is dropped silently. Shrunk copies of MindSpeed-LLM's "
        "DeepSeek-V3 pretrain, SFT and data_convert scripts and of Megatron-LM's DeepSeek-V2-Lite configuration "
        "run in tests/public_scripts/ with only the entry point changed.",
        "",
        "Steps:",
        "",
        "1. Data: run the script's `preprocess_data.py` line against `tools/preprocess_data.py` (JSON, JSONL or "
        "parquet input; MindSpeed's handler names, `--map-keys` and `--prompt-type deepseek2|deepseek3` work).",
        "2. Weights: `tools/convert_ckpt.py` with the script's conversion flags, or keep MindSpeed's "
        "`--enable-hf2mg-convert` with `--load` on the HuggingFace directory (converted once at start-up).",
        "3. Training: change the entry point as above, keep every flag, and read the start-up line "
        "(`accepted, no effect here: ...`) and any `note:` lines. A refused flag stops the run with one line naming "
        "the nearest supported option.",
        "",
        "Flags accepted without effect are named in one start-up line (`accepted, no effect here: ...`), "
        "grouped as: what we always do; kernel choices (same results); choices not built yet (the line says "
        "what runs instead, and what that costs in memory or speed); logging.",
        "",
        "**Model defaults.** With `--model-config` the architecture comes from the HF config.json and flags "
        "override it. Without it, `--model-type` (or MindSpeed's `--model-type-hf`) picks the family's "
        "defaults (deepseek_v3: DeepSeek-V3's config; deepseek_v2: DeepSeek-V2-Lite's, i.e. no query LoRA, "
        "softmax greedy routing without expert bias or top-k normalisation). A command line with "
        "`--multi-latent-attention` describes the model Megatron-style: what it leaves out takes Megatron-LM's "
        "defaults (see the alias row), as Megatron-LM and MindSpeed-LLM would read it.",
        "",
        "`--sequence-parallel` at `--tensor-model-parallel-size 1` is turned off with a note, as Megatron-LM "
        "does.",
        "",
        f"## Aliases ({len(al)} flags, plus {len(VALUE_SPELLINGS)} value spellings)",
        "",
        "| flag | from | means here |",
        "|---|---|---|",
    ]
    out += [f"| {_names(f)} | {f.origin} | {_md(f.means)} |" for f in al]
    out += ["", "Value spellings of our own flags:", "", "| flag | value | ours | note |", "|---|---|---|---|"]
    out += [f"| `{fl}` | `{_md(v)}` | `{_md(o)}` | {_md(n)} |" for fl, v, o, n in VALUE_SPELLINGS]
    out += ["", f"## Accepted, no effect here ({len(ne)} flags)", "",
            "| flag | from | group | what it selects here | runs instead (not built) | values accepted |",
            "|---|---|---|---|---|---|"]
    out += [f"| {_names(f)} | {f.origin} | {f.group.split(' (')[0].split(',')[0]} | {_md(f.means)} | "
            f"{_md(f.instead)} | {', '.join(f.allowed) if f.allowed else 'any'} |" for f in ne]
    out += ["", f"## Refused ({len(rf)} flags)", "", "| flag | from | why | nearest supported |",
            "|---|---|---|---|"]
    out += [f"| {_names(f)} | {f.origin} | {_md(f.means)} | {_md(f.instead)} |" for f in rf]
    for title, flags, tool in (("tools/preprocess_data.py", PREPROCESS_FLAGS, "preprocess"),
                               ("tools/convert_ckpt.py", CONVERT_FLAGS, "convert")):
        out += ["", f"## {title}", "", "| flag | class | means here |", "|---|---|---|"]
        out += [f"| {_names(f)} | {f.kind} | {_md(f.means)}"
                + (f"; nearest: {_md(f.instead)}" if f.kind == REFUSED else "") + " |" for f in flags]
    out += ["", "## Flags other parts of megatron_ascend define", "",
            "Layer placement (`--pipeline-model-parallel-layout`, `--num-layer-list`, `--noop-layers`), "
            "`--context-parallel-size` and the NaN / determinism / scheduler-override flags are ours: see "
            "`python -m megatron_ascend.pretrain --help` and docs/USER_GUIDE.md.", ""]
    return "\n".join(out)


def write_migrating(path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(migrating_markdown())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ascend.arguments_compat", allow_abbrev=False,
                                description="Write docs/MIGRATING.md from the compatibility table.")
    p.add_argument("--write", metavar="PATH", help="write the Markdown there (default: print it)")
    a = p.parse_args(argv)
    if a.write:
        write_migrating(a.write)
    else:
        print(migrating_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
