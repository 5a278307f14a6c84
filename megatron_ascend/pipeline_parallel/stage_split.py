"""Which decoder layers each pipeline rank (and virtual chunk) holds, and which chunk is first / last.

Owns: ``stage_layer_ids`` (global layer indices of one chunk), ``ChunkSpec`` / ``model_chunk_specs`` (everything
a model builder needs per chunk: layer ids, ``pre_process``, ``post_process``).

Rules (Megatron's):
* The decoder stack is cut into ``pp * vp`` contiguous blocks of layers; chunk ``v`` of pipeline rank ``p`` holds
  block ``v * pp + p`` (interleaved assignment). 16 layers, PP4, VP2: rank 0 holds [0, 1] and [8, 9].
* Block sizes come from ``config.pipeline_layer_split`` (which also validates them): even, or with
  ``first`` / ``last`` layers on the first / last pipeline rank (--decoder-first/last-pipeline-num-layers),
  split over that rank's virtual chunks.
* The embedding lives on the first chunk of rank 0 (``pre_process``); the final norm, output head, loss and the
  MTP layers on the last chunk of rank pp-1 (``post_process``).

Does not own: building the model (models/), the tie between embedding copies (embedding_sync.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..config import ConfigError, pipeline_layer_split


def _check_ranks(pp_size: int, pp_rank: int, vp_size: int, vp_rank: int) -> None:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConfigError(f"pipeline rank {pp_rank} is outside pipeline-model-parallel-size {pp_size}; "
                          f"use 0 <= pp_rank < {pp_size}")
    if vp_size < 1 or not 0 <= vp_rank < vp_size:
        raise ConfigError(f"virtual pipeline rank {vp_rank} is outside virtual-pipeline-model-parallel-size "
                          f"{vp_size}; use 0 <= vp_rank < {vp_size}")


def stage_layer_ids(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0,
                    first: Optional[int] = None, last: Optional[int] = None) -> List[int]:
    """Global indices of the decoder layers held by chunk ``vp_rank`` of pipeline rank ``pp_rank``."""
    _check_ranks(pp_size, pp_rank, vp_size, vp_rank)
    counts = pipeline_layer_split(num_layers, pp_size, vp_size, first, last)  # counts[v][p]
    # blocks in model order: block b = v * pp + p
    sizes = [counts[v][p] for v in range(vp_size) for p in range(pp_size)]
    block = vp_rank * pp_size + pp_rank
    start = sum(sizes[:block])
    return list(range(start, start + sizes[block]))


def is_first_chunk(pp_rank: int, vp_rank: int = 0) -> bool:
    """The chunk that holds the embedding (pre_process)."""
    return pp_rank == 0 and vp_rank == 0


def is_last_chunk(pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0) -> bool:
    """The chunk that holds final norm, head, loss and MTP (post_process)."""
    return pp_rank == pp_size - 1 and vp_rank == vp_size - 1


@dataclass(frozen=True)
class ChunkSpec:
    vp_rank: int
    layer_ids: List[int]
    pre_process: bool  # holds the embedding
    post_process: bool  # holds final norm, head, loss, MTP


def model_chunk_specs(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1,
                      first: Optional[int] = None, last: Optional[int] = None) -> List[ChunkSpec]:
    """One ChunkSpec per virtual chunk of this pipeline rank, in chunk order.

    A trainer builds ``[Model(cfg, ..., pre_process=c.pre_process, post_process=c.post_process,
    layer_ids=c.layer_ids) for c in model_chunk_specs(...)]`` and hands the list to the schedule."""
    return [ChunkSpec(v, stage_layer_ids(num_layers, pp_size, pp_rank, vp_size, v, first, last),
                      is_first_chunk(pp_rank, v), is_last_chunk(pp_size, pp_rank, vp_size, v))
            for v in range(vp_size)]
