"""Copies of the word embedding on more than one pipeline stage, kept equal through the embedding group.

With PP > 1 the word embedding can be needed on the last stage as well as the first: a tied output head
(``tie_word_embeddings``) or the MTP layers, which embed the shifted tokens with the *shared* embedding. The
last stage then holds its own copy of the (vocab-parallel shard of the) embedding weight, and

* at build time the copies are made equal (``sync_embedding_weights``: broadcast from the first stage);
* after every backward their grads are summed over ``groups.embedding`` (the first and last rank of each
  pipeline group) and written back to every copy (``allreduce_embedding_grads``), so each copy receives the
  single-process gradient of the one shared weight and identical optimizer steps keep them equal.

Protocol with the model: every copy is a parameter marked ``mark_shared_embedding(param)``
(``param.shared_embedding = True``, Megatron's name). Copies that are not on the first stage also get
``param.shared = True`` so the grad norm and the checkpoint count the weight once (only the first stage's copy
is canonical). Within one rank all copies receive the same total gradient. With PP = 1 one parameter serves
every use and nothing is communicated.

The gradient used is ``param.main_grad`` when the DDP wrapper provides one, else ``param.grad``. Call this after
the data-parallel gradient reduction (or before it: the sum is linear, but call it exactly once per step).
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from ..platform import get_platform
from ..tensor_parallel.wgrad import zero_if_stale


def mark_shared_embedding(param: torch.nn.Parameter, canonical: bool) -> torch.nn.Parameter:
    """Mark ``param`` as a copy of the word embedding; ``canonical`` is True for the first stage's copy."""
    param.shared_embedding = True
    param.shared = not canonical
    return param


def shared_embedding_params(model_chunks: Iterable[torch.nn.Module]) -> List[torch.nn.Parameter]:
    """All parameters marked as embedding copies, in a stable order (chunk order, then registration order)."""
    out, seen = [], set()
    for chunk in model_chunks:
        for p in chunk.parameters():
            if getattr(p, "shared_embedding", False) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _grad_of(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    g = getattr(p, "main_grad", None)
    if g is not None:
        zero_if_stale(p)  # lazily zeroed grad buffer (gradient-accumulation fusion): no grad this step = zeros
        return g
    return p.grad


def _group_agrees(params: List[torch.nn.Parameter], groups) -> bool:
    """True when every rank of the embedding group holds a copy (all of one size); False when only the first
    stage marks one (nothing to tie); an error when a later stage holds copies the first stage does not mark."""
    shapes = {tuple(p.shape) for p in params}
    if len(shapes) > 1:
        raise ValueError(f"embedding copies on rank {dist.get_rank()} have different shapes {sorted(shapes)}; "
                         f"mark only word-embedding weights (one vocab shard each) with mark_shared_embedding")
    ranks = groups.ranks["embedding"]
    dev = params[0].device if params else get_platform().device()
    t = torch.zeros(2 * len(ranks), dtype=torch.int64, device=dev)
    i = ranks.index(groups.rank)
    t[i] = len(params)
    t[len(ranks) + i] = params[0].numel() if params else 0
    dist.all_reduce(t, group=groups.embedding)
    counts, numels = t[:len(ranks)].tolist(), t[len(ranks):].tolist()
    if all(c > 0 for c in counts):
        if len(set(numels)) > 1:
            raise ValueError(f"embedding copies differ in size across the embedding group ranks {ranks} "
                             f"(elements {numels}); every copy must be the same vocab shard of the word embedding")
        return True
    if counts[0] > 0 or not any(counts):
        return False  # only the first stage marks its embedding (untied head, no MTP): nothing to tie
    raise ValueError(f"ranks {[r for r, c in zip(ranks, counts) if c]} of the embedding group {ranks} hold word-"
                     f"embedding copies (shared_embedding=True) but rank {ranks[0]} (first pipeline stage) marks "
                     f"none; mark the first stage's embedding weight with mark_shared_embedding(weight, "
                     f"canonical=True) so the copies can be kept in sync")


def _embedding_group_active(groups) -> bool:
    return groups is not None and "embedding" in groups.groups and len(groups.ranks["embedding"]) > 1


@torch.no_grad()
def sync_embedding_weights(model_chunks: Iterable[torch.nn.Module], groups) -> bool:
    """Make every copy equal to the first stage's copy. Returns True when something was synced."""
    params = shared_embedding_params(model_chunks)
    if not _embedding_group_active(groups):
        for p in params[1:]:
            p.copy_(params[0])
        return False
    if not _group_agrees(params, groups):
        return False
    src = groups.ranks["embedding"][0]
    buf = params[0].detach().clone()
    dist.broadcast(buf, src=src, group=groups.embedding)
    for p in params:
        p.copy_(buf)
    return True


@torch.no_grad()
def allreduce_embedding_grads(model_chunks: Iterable[torch.nn.Module], groups) -> bool:
    """Sum the grads of all embedding copies over the embedding group and give every copy the total.

    Returns True when an all-reduce happened (False with PP = 1 or when no stage but the first has a copy)."""
    params = shared_embedding_params(model_chunks)
    if not _embedding_group_active(groups):
        if len(params) > 1:  # several copies on one rank (unusual with PP = 1): still give each the total
            _sum_into_all(params)
        return False
    if not _group_agrees(params, groups):
        return False
    g = _grad_of(params[0]) if len(params) == 1 else None
    if g is not None:  # the usual case, one copy per rank: sum its grad in place (no [V/tp, h] temporary)
        dist.all_reduce(g, group=groups.embedding)
        return True
    total = _local_sum(params)
    dist.all_reduce(total, group=groups.embedding)
    _write_all(params, total)
    return True


def _local_sum(params: List[torch.nn.Parameter]) -> torch.Tensor:
    grads = [_grad_of(p) for p in params]
    ref = next((g for g in grads if g is not None), None)
    dtype = ref.dtype if ref is not None else params[0].dtype
    total = torch.zeros(params[0].shape, dtype=dtype, device=params[0].device)
    for g in grads:
        if g is not None:
            total.add_(g)
    return total


def _write_all(params: List[torch.nn.Parameter], total: torch.Tensor) -> None:
    for p in params:
        g = _grad_of(p)
        if g is None:
            p.grad = total.clone().to(p.dtype)
        else:
            g.copy_(total)


def _sum_into_all(params: List[torch.nn.Parameter]) -> None:
    _write_all(params, _local_sum(params))
