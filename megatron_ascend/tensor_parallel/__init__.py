"""Tensor parallelism: sharding metadata, region mappings, parallel linear / embedding layers,
vocab-parallel cross-entropy, RNG tracker, shard helpers."""
from .sharding import ShardSpec, init_normal_, mark_sharded, shard_spec
from .mappings import (all_to_all, copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
                       gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                       reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
                       scatter_to_tensor_model_parallel_region)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, tp_info
from .cross_entropy import vocab_parallel_cross_entropy
from .random import RNGStatesTracker, get_rng_tracker, model_parallel_seed
from .utils import allreduce_sequence_parallel_grads, gather_full, shard_of

import types as _types

__all__ = [n for n, v in list(globals().items()) if not n.startswith("_") and not isinstance(v, _types.ModuleType)]
