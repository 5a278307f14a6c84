"""Sharded checkpoints with resharding (torch.distributed.checkpoint), atomic commit, retention, async save,
and HuggingFace safetensors import / export (FP8 / FP4 dequantisation, V4 in transformers' or DeepSeek's
naming: hf_dir.py, v4_names.py, fp8.py, fp4.py).

Public interface (see docs/CHECKPOINTS.md):
    save_checkpoint(save_dir, iteration, model_chunks, optimizer, scheduler, groups, extra_state, ...)
    load_checkpoint(load_dir, model_chunks, optimizer, scheduler, groups, finetune, no_load_optim, no_load_rng)
        -> (iteration, extra_state)
    wait_for_pending_save()
    find_checkpoint(root, verify="size"|"checksum"|None, fallback=True) -> (path, iteration)   (one process)
    hf.convert_hf_to_ma(...), hf.convert_ma_to_hf(...), hf_rewrite.convert_hf_to_hf(...)
"""
from .errors import CheckpointError
from .checkpoint import load_checkpoint, save_checkpoint, wait_for_pending_save
from .selection import TRACKER, checkpoint_candidates, checkpoint_dir, find_checkpoint, read_common

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "wait_for_pending_save", "find_checkpoint",
           "checkpoint_candidates", "read_common", "checkpoint_dir", "TRACKER"]
