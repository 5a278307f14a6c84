"""RNG tracker: named random states so that dropout inside and outside TP regions is right.

Megatron's rule: the default generator is the same on every TP rank (dropout on replicated activations
must agree across the TP group), while activations that are *split* over TP (attention heads, the
column-parallel half of an MLP) draw from a ``model-parallel-rng`` state seeded per TP rank, and expert
weights/activations from an ``expert-parallel-rng`` state seeded per (ep, etp) rank.

    tracker = get_rng_tracker()
    with tracker.fork():                  # model-parallel state, restored to the default afterwards
        y = F.dropout(x_split_over_tp, p)

Initialisation does not use this (it is layout independent: sharding.init_normal_ draws by global name).
``get_states`` / ``set_states`` capture every named state for checkpointing and for activation recompute
(recompute replays the same random numbers).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from .. import platform

MODEL_PARALLEL_RNG = "model-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"
_TP_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named platform RNG states (CPU + accelerator), swapped in by ``fork(name)``."""

    def __init__(self):
        self.states: Dict[str, Dict[str, torch.Tensor]] = {}
        self.seeds = set()

    def reset(self) -> None:
        self.states.clear()
        self.seeds.clear()

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"RNG seed {seed} is already used by another tracked state; pick a distinct seed")
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists; call reset() first")
        saved = platform.get_rng_state()
        torch.manual_seed(seed)
        self.states[name] = platform.get_rng_state()
        platform.set_rng_state(saved)
        self.seeds.add(seed)

    def get_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {k: {d: t.clone() for d, t in v.items()} for k, v in self.states.items()}

    def set_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self.states = {k: {d: t.clone() for d, t in v.items()} for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} is not tracked; call model_parallel_seed(seed, groups) first")
        saved = platform.get_rng_state()
        platform.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = platform.get_rng_state()
            platform.set_rng_state(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, groups=None, tracker: Optional[RNGStatesTracker] = None) -> None:
    """Seed the default generator (same on all TP ranks of a stage, distinct per PP stage) and the tracked
    model-parallel (per TP rank) and expert-parallel (per EP x ETP rank) states (Megatron's offsets)."""
    tracker = tracker or _TRACKER
    tp_rank = groups.tp_rank if groups is not None else 0
    pp_rank = groups.pp_rank if groups is not None and "pp" in groups.ranks else 0
    ep_rank = groups.ep_rank if groups is not None and "ep" in groups.ranks else 0
    etp_rank = groups.etp_rank if groups is not None and "etp" in groups.ranks else 0
    dp_rank = groups.dp_rank if groups is not None and "dp" in groups.ranks else 0
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, base + _TP_SEED_OFFSET + tp_rank)
    tracker.add(EXPERT_PARALLEL_RNG, base + _TP_SEED_OFFSET + 1000 + 100 * ep_rank + etp_rank)
    tracker.add(DATA_PARALLEL_RNG, base + _TP_SEED_OFFSET + 100000 + dp_rank)


# SavedTensorMeter instances (megatron_ascend.recompute) measuring right now; checkpoints report the inputs they
# keep alive to them (torch's checkpoint holds its inputs by reference, not through saved-tensor hooks)
ACTIVE_METERS: list = []


def _report_kept(tensors) -> None:
    for m in ACTIVE_METERS:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                m.record(t, kept_by_checkpoint=True)


def checkpoint(fn, *args, **kwargs):
    """Activation checkpoint of ``fn(*args)`` (torch's non-reentrant checkpoint) that replays the same random
    numbers on recompute: the CPU / accelerator generators (torch restores them) and every state of the RNG
    tracker (restored here to its value at forward time, then put back). Recompute is bitwise the forward."""
    import torch.utils.checkpoint as tuc

    tracker = _TRACKER
    saved = tracker.get_states() if tracker.states else None

    @contextlib.contextmanager
    def _recompute_ctx():
        if saved is None:
            yield
            return
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    def context_fn():
        return contextlib.nullcontext(), _recompute_ctx()

    _report_kept(args)
    return tuc.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **kwargs)


class _Recompute:
    """Placeholder packed instead of a discarded output (or a view of it)."""


def _owns_storage(t: torch.Tensor) -> bool:
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def checkpoint_discard_output(fn, x, consumer, *, checkpoint_fn: bool = True):
    """``consumer(fn(x))`` without keeping fn's outputs for backward -- Megatron's CheckpointWithoutOutput.

    ``x`` is a tensor or a tuple of arguments (fn(*x)); fn returns a tensor or a tuple of tensors, handed to the
    consumer the same way. While the consumer runs, every tensor it saves for backward that lies on an output's
    storage (the output or any view of it, e.g. the permuted q/k/v an attention kernel saves) is packed as a
    placeholder; the first backward unpack recomputes fn from x once (same kernels as the forward: grad mode on,
    inputs' requires_grad as in the forward) and hands out the same views of the recomputed outputs. Only
    outputs that own their storage are discarded (a view into a larger tensor is kept as is).

    ``checkpoint_fn=True``: fn itself is checkpointed too (only x is kept; its internals are recomputed again by
    the checkpoint in fn's backward) -- for norms / activations whose internals are as large as the output.
    ``checkpoint_fn=False``: fn runs as is and keeps what it saves itself; use it when that is only x and
    parameters (linear layers + elementwise ops on non-grad tables, e.g. MLA's up-projections + RoPE), so fn
    is recomputed exactly once. fn must be deterministic (no dropout)."""
    args = x if isinstance(x, tuple) else (x,)
    y = checkpoint(fn, *args) if checkpoint_fn else fn(*args)
    outs = y if isinstance(y, tuple) else (y,)
    owned = {}
    for j, o in enumerate(outs):
        if isinstance(o, torch.Tensor) and o.requires_grad and _owns_storage(o):
            owned[o.untyped_storage().data_ptr()] = j
    meta = [(o.shape, o.stride(), o.dtype) if isinstance(o, torch.Tensor) else None for o in outs]
    cache = {}

    def pack(t):
        j = owned.get(t.untyped_storage().data_ptr())
        if j is not None and t.dtype == meta[j][2]:
            return (_Recompute, j, t.shape, t.stride(), t.storage_offset())
        for m in ACTIVE_METERS:  # these hooks shadow a meter's own; report what is really kept
            m.record(t)
        return t

    def recompute():
        det = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        with torch.enable_grad():
            r = fn(*det)
        r = r if isinstance(r, tuple) else (r,)
        res = []
        for j, o in enumerate(r):
            o = o.detach() if isinstance(o, torch.Tensor) else o
            # the forward's layout, so the saved views map onto the recomputed output
            if j in owned.values() and (o.stride() != meta[j][1] or o.storage_offset() != 0):
                o = torch.empty_strided(meta[j][0], meta[j][1], dtype=o.dtype, device=o.device).copy_(o)
            res.append(o)
        return res

    def unpack(p):
        if isinstance(p, tuple) and p and p[0] is _Recompute:
            if "y" not in cache:
                cache["y"] = recompute()
            _, j, shape, stride, offset = p
            return cache["y"][j].as_strided(shape, stride, offset)
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return consumer(*outs) if isinstance(y, tuple) else consumer(y)
