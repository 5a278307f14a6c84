"""Which decoder layers each pipeline rank (and virtual chunk) holds, and which chunk embeds, runs MTP and
computes the loss: the model builders' view of ``megatron_ascend.placement`` (the one placement function).

Owns: ``ChunkSpec`` / ``model_chunk_specs`` (everything a model builder needs per chunk: layer ids,
``pre_process``, ``post_process``, ``include_mtp``, ``mtp_in_input``), ``chunk_specs(placement, pp_rank)`` and
``stage_layer_ids`` (global layer indices of one chunk).

Rules (placement.py has them all): chunk ``v`` of pipeline rank ``p`` is virtual stage ``v * pp + p``
(interleaved assignment; 16 layers, PP4, VP2: rank 0 holds [0, 1] and [8, 9]); the split is even, or
``first`` / ``last`` layers on the first / last pipeline rank, or MindSpeed's ``num_layer_list`` (with
``noop_layers`` padding it), or a Megatron-Core layout string. The embedding lives on the first chunk of rank 0
(``pre_process``); the output head and the loss on the last chunk of rank pp-1 (``post_process``); the MTP
layers on the loss chunk, or on an earlier chunk of their own (layout ``...m|L``: that chunk's output carries
the MTP hidden states to the loss chunk, ``mtp_in_input``).

Does not own: building the model (models/), the tie between embedding copies (embedding_sync.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..config import ConfigError
from ..placement import Placement, place


def _check_ranks(pp_size: int, pp_rank: int, vp_size: int, vp_rank: int) -> None:
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConfigError(f"pipeline rank {pp_rank} is outside pipeline-model-parallel-size {pp_size}; "
                          f"use 0 <= pp_rank < {pp_size}")
    if vp_size < 1 or not 0 <= vp_rank < vp_size:
        raise ConfigError(f"virtual pipeline rank {vp_rank} is outside virtual-pipeline-model-parallel-size "
                          f"{vp_size}; use 0 <= vp_rank < {vp_size}")


def stage_layer_ids(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0,
                    first: Optional[int] = None, last: Optional[int] = None, *,
                    num_layer_list: Sequence[int] = (), noop_layers: Sequence[int] = ()) -> List[int]:
    """Global indices of the (real) decoder layers held by chunk ``vp_rank`` of pipeline rank ``pp_rank``."""
    _check_ranks(pp_size, pp_rank, vp_size, vp_rank)
    p = place(num_layers, pp_size, vp_size, num_layer_list=num_layer_list, noop_layers=noop_layers,
              first=first, last=last)
    return list(p.chunks(pp_rank)[vp_rank].layer_ids)


def is_first_chunk(pp_rank: int, vp_rank: int = 0) -> bool:
    """The chunk that holds the embedding (pre_process)."""
    return pp_rank == 0 and vp_rank == 0


def is_last_chunk(pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0) -> bool:
    """The chunk that holds the head and the loss (post_process)."""
    return pp_rank == pp_size - 1 and vp_rank == vp_size - 1


@dataclass(frozen=True)
class ChunkSpec:
    vp_rank: int
    layer_ids: List[int]
    pre_process: bool                    # holds the embedding
    post_process: bool                   # holds the output head and the loss
    include_mtp: Optional[bool] = None   # holds the MTP layers (None: the model's default, = post_process)
    mtp_in_input: bool = False           # its input carries the MTP hidden states (MTP ran on an earlier chunk)


def chunk_specs(placement: Placement, pp_rank: int) -> List[ChunkSpec]:
    """One ChunkSpec per virtual chunk of this pipeline rank, from a placement (placement.placement_of)."""
    return [ChunkSpec(s.vp_rank, list(s.layer_ids), s.embedding, s.loss, s.mtp, s.mtp_in_input)
            for s in placement.chunks(pp_rank)]


def model_chunk_specs(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1,
                      first: Optional[int] = None, last: Optional[int] = None, *, mtp_layers: Optional[int] = None,
                      layout: Optional[str] = None, num_layer_list: Sequence[int] = (),
                      noop_layers: Sequence[int] = (), tied: bool = False) -> List[ChunkSpec]:
    """One ChunkSpec per virtual chunk of this pipeline rank, in chunk order.

    A trainer builds ``[Model(cfg, ..., pre_process=c.pre_process, post_process=c.post_process,
    layer_ids=c.layer_ids, include_mtp=c.include_mtp) for c in model_chunk_specs(...)]`` and hands the list to
    the schedule. ``mtp_layers=None`` leaves ``include_mtp`` to the model (MTP on the loss chunk); give the MTP
    depth to place it from ``layout``. With ``layout`` the virtual size comes from the string (``vp_size`` must
    be 1 or agree)."""
    _check_ranks(pp_size, pp_rank, 1, 0)
    p = place(num_layers, pp_size, (None if layout and vp_size == 1 else vp_size), mtp_layers=mtp_layers or 0,
              layout=layout, num_layer_list=num_layer_list, noop_layers=noop_layers, first=first, last=last,
              tied=tied)
    specs = chunk_specs(p, pp_rank)
    if mtp_layers is None:
        specs = [ChunkSpec(c.vp_rank, c.layer_ids, c.pre_process, c.post_process) for c in specs]
    return specs
