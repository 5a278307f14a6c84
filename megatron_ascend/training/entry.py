"""Shared body of the pretrain / posttrain entry points.

``run(argv, stage)`` parses the Megatron-style flags, trains, and returns the TrainResult (tests call it inside
harness.run_distributed workers, where torch.distributed is already initialised); ``cli(argv, stage)`` is the
command-line form: --show-layout prints the rank layout and exits 0, a configuration / data / checkpoint
error prints one line and exits 2, a run stopped by --nan-policy stop exits 3 (after saving the last good
state), a finished (or SIGTERM-interrupted, checkpointed) run exits 0.

Before training, rank 0 prints the foreign flags accepted without effect (one line, arguments_compat) and
any notes; with MindSpeed-LLM's ``--enable-hf2mg-convert`` the HuggingFace directory given to --load is
converted once (to LOAD/megatron_ascend_hf2ma) and loaded from there.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

from .. import arguments_compat
from ..arguments import build_configs, parse_args
from ..config import ConfigError
from ..parallel_state import RankLayout
from ..placement import placement_of

DESCRIPTIONS = {
    "pretrain": "Pretrain a DeepSeek-family MoE model (MLA, DeepSeekMoE, MTP) with TP/SP, PP (1F1B, interleaved), "
                "EP and DP with the distributed optimizer. Launch under torchrun; flags follow Megatron-LM / "
                "MindSpeed-LLM. Guide: docs/USER_GUIDE.md.",
    "sft": "Full-parameter post-training (SFT) of a DeepSeek-family model from a pretrained checkpoint (--load, "
           "implies --finetune unless --no-finetune) on instruction data preprocessed with "
           "tools/preprocess_data.py --sft. Launch under torchrun. Guide: docs/USER_GUIDE.md.",
}


def add_posttrain_args(p) -> None:
    g = p.add_argument_group("post-training")
    g.add_argument("--stage", default="sft", choices=["sft", "dpo"],
                   help="sft: supervised fine-tuning (loss on assistant tokens). dpo: reserved for preference "
                        "tuning, not implemented yet")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="accepted for MindSpeed-LLM compatibility (posttrain always reads instruction data)")
    g.add_argument("--prompt-type", default=None,
                   help="chat template the data was preprocessed with (recorded in TensorBoard; the template is "
                        "applied by tools/preprocess_data.py --prompt-type)")
    g.add_argument("--sft-packing", action="store_true",
                   help="pack several conversations into one --seq-length sample (segment ids keep them apart)")
    g.add_argument("--no-finetune", action="store_true",
                   help="resume an interrupted SFT run (iteration, optimizer) instead of starting from the "
                        "pretrained weights")


def _errors():
    errs = [ConfigError]
    try:
        from ..data.errors import DataError
        errs.append(DataError)
    except ImportError:
        pass
    try:
        from ..checkpointing import CheckpointError
        errs.append(CheckpointError)
    except ImportError:
        pass
    return tuple(errs)


def parse(argv: Optional[List[str]], stage: str):
    prog = "python -m megatron_ascend." + ("pretrain" if stage == "pretrain" else "posttrain")
    extra: Optional[Callable] = add_posttrain_args if stage != "pretrain" else None
    args = parse_args(argv, prog=prog, description=DESCRIPTIONS["pretrain" if stage == "pretrain" else "sft"],
                      extra_args=extra)
    if stage != "pretrain":
        if args.stage != "sft":
            raise ConfigError(f"--stage {args.stage} (preference tuning) is not implemented yet; use --stage sft")
        if args.load and not args.no_finetune and not args.finetune:
            args.finetune = True  # SFT starts from the pretrained weights with a fresh optimizer and iteration
        if args.no_finetune:
            args.finetune = False
    return args


HF2MA_SUBDIR = "megatron_ascend_hf2ma"


def convert_hf_at_load(args) -> None:
    """--enable-hf2mg-convert: --load holds a HuggingFace checkpoint; rank 0 converts it (once) into
    LOAD/megatron_ascend_hf2ma while the others wait, then every rank loads from there (weights only)."""
    import subprocess
    import torch
    import torch.distributed as dist
    from .. import platform
    from ..checkpointing import find_checkpoint
    load = args.load
    if not load:
        raise ConfigError("--enable-hf2mg-convert needs --load (the HuggingFace checkpoint directory)")
    if not (os.path.isfile(os.path.join(load, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(load))):
        raise ConfigError(f"--enable-hf2mg-convert: --load {load!r} holds no HuggingFace checkpoint (config.json "
                          f"and *.safetensors); give the HF directory, or drop the flag to load our checkpoint")
    platform.init_distributed(options=platform.RuntimeOptions.from_args(args))  # the HCCL environment first
    out = os.path.join(load, HF2MA_SUBDIR)
    failed = torch.zeros(1, device=platform.get_platform().device())  # NCCL / HCCL reduce device tensors only
    if dist.get_rank() == 0 and find_checkpoint(out)[0] is None:
        # in a process of its own: the conversion writes with torch.distributed.checkpoint, which would
        # otherwise be collective over this job's ranks
        print(f"converting the HuggingFace checkpoint {load} to {out} (--enable-hf2mg-convert)", flush=True)
        code = ("import sys; from megatron_ascend.checkpointing import hf; "
                "hf.convert_hf_to_ma(sys.argv[1], sys.argv[2], progress=False)")
        r = subprocess.run([sys.executable, "-c", code, load, out], stderr=subprocess.PIPE, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            failed += 1
    dist.all_reduce(failed)
    if failed.item():
        raise ConfigError(f"--enable-hf2mg-convert: converting {load} failed (the reason is printed above); "
                          f"tools/convert_ckpt.py --load-dir {load} --save-dir DIR shows it alone")
    args.load = out


def run(argv: Optional[List[str]] = None, stage: str = "pretrain", print_fn=None):
    """Parse, build, train; returns the TrainResult (or None for --show-layout)."""
    from .trainer import Trainer
    args = parse(argv, stage)
    rank = None
    try:
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else None
    except ImportError:  # pragma: no cover
        pass
    arguments_compat.print_startup(args.compat_resolved, rank)
    if getattr(args, "convert_hf_at_load", False) and not args.show_layout:
        convert_hf_at_load(args)
    if args.show_layout:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        model, par, _, _, _ = build_configs(args, world)
        placement = placement_of(model, par)
        print(RankLayout(par, placement.embedding_pp_ranks).format())
        print(placement.format())
        return None
    import torch.distributed as dist
    owns_group = not dist.is_initialized()  # the trainer initialises torch.distributed: tear it down here too
    trainer = Trainer(args, stage="pretrain" if stage == "pretrain" else args.stage, print_fn=print_fn)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if owns_group and dist.is_initialized():
        # every rank is done (checkpoint committed) before any rank tears its communicators down: a rank that
        # exits with live gloo / HCCL threads while a peer still talks to it can abort the job at exit
        dist.barrier()
        dist.destroy_process_group()
    return result


def _rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0") or 0)


def cli(argv: Optional[List[str]] = None, stage: str = "pretrain") -> int:
    """Exit code 2 with one ``error: ...`` line on stderr for a configuration / data / checkpoint error, printed
    by rank 0 only (every rank meets the same error: flags are checked before any process group exists, and
    checkpoint / data errors are agreed over the ranks), so under torchrun that line comes first, once."""
    from .health import TrainingHalted
    try:
        run(argv, stage)
    except _errors() as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingHalted as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0
