"""Data parallelism: contiguous gradient buffers, bucketed (reduce-scatter | all-reduce) over dp / expert-dp,
overlap with backward. See ddp.py for the contract."""
from .ddp import GRADIENT_SCALINGS, DistributedDataParallel, unwrap_model
from .grad_buffer import Bucket, GradBuffer, ParamSlot

__all__ = ["DistributedDataParallel", "unwrap_model", "GradBuffer", "Bucket", "ParamSlot", "GRADIENT_SCALINGS"]
