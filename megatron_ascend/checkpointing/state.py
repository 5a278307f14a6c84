"""What goes into a checkpoint, as global-coordinate Chunks: model tensors, optimizer state, RNG states.

Owns the translation from live objects to ``dcp_io.Chunk`` lists (and back, in place):

* model: every parameter and persistent buffer of every model chunk (DDP-style wrappers with ``.module``
  are unwrapped), keyed by its layout-independent name; ``param.shard`` (tensor_parallel/sharding.py) gives
  the global shape and this rank's offsets.
* optimizer: per-parameter state in the parameter's global coordinates, keyed
  ``optimizer/<param name>/<state key>``. Two sources:

  - an optimizer with ``sharded_param_state()`` (our distributed optimizer). The contract, for the optimizer
    package to implement::

        optimizer.sharded_param_state() -> Iterable[(param, {key: tensor}, flat_range)]

    ``param`` is the *model* parameter (the one in model_chunks, carrying ``.shard``); ``{key: tensor}``
    are the live state tensors (``exp_avg``, ``exp_avg_sq``, ``main_param`` ...), which load writes into
    in place, so they must be allocated before ``load_checkpoint``; ``flat_range`` is ``None`` when the
    tensors cover the whole local param (shaped like it or flat), or ``(start, end)`` when they are a 1-D
    shard holding elements [start, end) of the row-major flattened local param (ZeRO-1: each dp rank owns a
    contiguous range of the flat buffer; the range is cut into rectangular boxes, see
    ``dcp_io.flat_range_boxes``, so the state reshards like the weights). 0-d tensors are replicated scalars.
    Non-tensor optimizer state goes through ``state_dict_common() -> dict`` (JSON) and
    ``load_state_dict_common(dict)``.
  - any ``torch.optim`` optimizer (Adam / AdamW / SGD): its per-param ``state`` tensors (materialised as
    zeros before a load if the optimizer has not stepped yet) and its param_groups' hyper-parameters.

  A ``main_param`` that a checkpoint lacks is filled from the model weight of the same name.
* RNG: torch CPU (and accelerator) generator, Python ``random``, NumPy, and the tensor-parallel RNG
  tracker's states when that module provides ``get_rng_tracker().get_states()`` - all as tensors, keyed
  ``rng/<global rank>/<kind>``, so each rank restores its own.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..tensor_parallel.sharding import shard_spec
from .dcp_io import Chunk, CheckpointError, flat_shard_chunks

OPT_PREFIX = "optimizer/"
RNG_PREFIX = "rng/"


# ---------------------------------------------------------------------------------------------- model
def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


_VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def model_tensors(model_chunks: Sequence[torch.nn.Module]) -> List[Tuple[str, torch.Tensor, Dict[str, Any]]]:
    """(name, tensor, info) for every parameter and persistent buffer of all chunks (names are global).

    info: ``copy`` - a non-canonical copy of a weight held elsewhere too (the last pipeline stage's word
    embedding for MTP / a tied head: ``param.shared``, or ``shared_embedding`` on a chunk without
    pre_process); saved by its canonical owner only, loaded like any other tensor. ``vocab`` - the real
    vocab size when the tensor's dim 0 is the TP-padded vocab (the padding rows are not stored, so the
    stored global shape does not depend on TP)."""
    out = []
    for chunk in model_chunks:
        m = unwrap(chunk)
        vocab, padded = getattr(m, "vocab_size", None), getattr(m, "padded_vocab_size", None)
        for name, t in m.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):
                continue
            copy = bool(getattr(t, "shared", False)) or (
                bool(getattr(t, "shared_embedding", False)) and not getattr(m, "pre_process", True))
            info = {"copy": copy, "vocab": None}
            if name in _VOCAB_NAMES and vocab and padded and padded != vocab:
                info["vocab"] = int(vocab)
            out.append((name, t, info))
    return out


def param_names(model_chunks: Sequence[torch.nn.Module]) -> Dict[int, Tuple[str, Dict[str, Any]]]:
    names = {}
    for name, t, info in model_tensors(model_chunks):
        if isinstance(t, torch.nn.Parameter):
            names.setdefault(id(t), (name, info))
    return names


def global_box(t: torch.Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    spec = shard_spec(t)
    return spec.global_shape(tuple(t.shape)), spec.offsets(tuple(t.shape))


def crop_vocab(c: Chunk, vocab: Optional[int]) -> Optional[Chunk]:
    """The part of ``c`` inside rows [0, vocab) of dim 0 (None when it holds padding rows only)."""
    if vocab is None or not c.global_shape:
        return c
    o, n = c.offsets[0], c.shape[0]
    keep = min(n, vocab - o)
    if keep <= 0:
        return None
    return Chunk(c.fqn, (vocab,) + c.global_shape[1:], c.offsets, c.tensor.narrow(0, 0, keep))


def _finish(chunks: List[Chunk], info: Dict[str, Any], for_save: bool) -> List[Chunk]:
    if for_save and info["copy"]:
        return []
    return [x for x in (crop_vocab(c, info["vocab"]) for c in chunks) if x is not None]


def model_chunks_of(model_chunks: Sequence[torch.nn.Module], for_save: bool = False) -> List[Chunk]:
    out = []
    for name, t, info in model_tensors(model_chunks):
        g, off = global_box(t)
        out += _finish([Chunk(name, g, off, t.detach())], info, for_save)
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def _materialize_torch_state(opt: torch.optim.Optimizer) -> None:
    """Give every param of a torch optimizer the state tensors its step would create (zeros), so a load has
    somewhere to write. Only the optimizers whose state we know (Adam / AdamW / SGD with momentum).
    The params it filled are remembered in ``opt._ma_materialized`` (see drop_unloaded_state)."""
    opt._ma_materialized = set()
    for group in opt.param_groups:
        for p in group["params"]:
            if not p.requires_grad or opt.state.get(p):
                continue
            if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                opt.state[p] = st
                opt._ma_materialized.add(p)
            elif isinstance(opt, torch.optim.SGD):
                if group.get("momentum", 0):
                    opt.state[p] = {"momentum_buffer": torch.zeros_like(p)}
                    opt._ma_materialized.add(p)
            else:
                raise CheckpointError(f"cannot load optimizer state into {type(opt).__name__} before its first step; "
                                      f"give it sharded_param_state() or pass --no-load-optim")


def _param_states(optimizer, for_load: bool) -> Iterable[Tuple[torch.Tensor, Dict[str, torch.Tensor], Any]]:
    if hasattr(optimizer, "sharded_param_state"):
        return optimizer.sharded_param_state()
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CheckpointError(f"optimizer {type(optimizer).__name__} has neither sharded_param_state() nor is a "
                              f"torch.optim.Optimizer; the checkpoint cannot save its state")
    if for_load:
        _materialize_torch_state(optimizer)
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                out.append((p, {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}, None))
    return out


def optimizer_chunks(optimizer, model_chunks: Sequence[torch.nn.Module], for_load: bool = False) -> List[Chunk]:
    names = param_names(model_chunks)
    out = []
    for p, states, flat_range in _param_states(optimizer, for_load):
        if id(p) not in names:
            raise CheckpointError("optimizer holds a parameter that is not in model_chunks; pass the same model "
                                  "chunks the optimizer was built from")
        name, info = names[id(p)]
        g, off = global_box(p)
        local = tuple(p.shape)
        for key, t in states.items():
            fqn = f"{OPT_PREFIX}{name}/{key}"
            if t.dim() == 0:
                cs = [Chunk(fqn, (), (), t.detach())]
            elif flat_range is None:
                if t.numel() != p.numel():
                    raise CheckpointError(f"optimizer state {key} of {name} has {t.numel()} elements, the param "
                                          f"{p.numel()}; give a flat_range for sharded state")
                cs = [Chunk(fqn, g, off, t.detach().view(local))]
            else:
                start, end = flat_range
                cs = flat_shard_chunks(fqn, g, off, local, int(start), int(end), t.detach().view(-1))
            out += _finish(cs, info if t.dim() else dict(info, vocab=None), not for_load)
    return out


def drop_unloaded_state(optimizer, model_chunks, skipped_names) -> None:
    """A torch optimizer's params whose state the checkpoint did not have (the saver had not stepped them)
    go back to having no state, so their first step starts like a fresh optimizer's."""
    made = getattr(optimizer, "_ma_materialized", set())
    names = param_names(model_chunks)
    for p in list(made):
        if id(p) in names and names[id(p)][0] in skipped_names:
            optimizer.state.pop(p, None)
    optimizer._ma_materialized = set()


def optimizer_common(optimizer) -> Dict[str, Any]:
    if hasattr(optimizer, "state_dict_common"):
        return {"kind": "sharded", "state": optimizer.state_dict_common()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"kind": "torch", "type": type(optimizer).__name__, "param_groups": groups}


def load_optimizer_common(optimizer, common: Dict[str, Any]) -> List[str]:
    """Restore non-tensor optimizer state; returns warnings."""
    if hasattr(optimizer, "load_state_dict_common"):
        if common.get("kind") == "sharded":
            optimizer.load_state_dict_common(common["state"])
            return []
        return [f"checkpoint optimizer hyper-parameters come from {common.get('type')}; kept the current ones"]
    groups = common.get("param_groups")
    if common.get("kind") != "torch" or groups is None or len(groups) != len(optimizer.param_groups):
        return ["checkpoint optimizer param groups do not match this optimizer's; kept the current hyper-parameters"]
    for g, saved in zip(optimizer.param_groups, groups):
        for k, v in saved.items():
            if k in g:
                g[k] = tuple(v) if isinstance(g[k], tuple) else v
    return []


# ---------------------------------------------------------------------------------------------- rng
def _tracker():
    try:
        from ..tensor_parallel import random as tp_random  # written by the tensor_parallel engineer
    except Exception:
        return None
    get = getattr(tp_random, "get_rng_tracker", None)
    return get() if get is not None else None


def rng_tensors() -> Dict[str, torch.Tensor]:
    """This rank's RNG states as tensors (keys without the rank prefix)."""
    from .. import platform

    out = {}
    for k, v in platform.get_rng_state().items():
        out[f"torch_{k}"] = v.clone()
    version, mt, gauss = random.getstate()
    out["python_state"] = torch.tensor([version, *mt], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([0.0 if gauss is None else 1.0, gauss or 0.0], dtype=torch.float64)
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        out["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    except ImportError:
        pass
    tracker = _tracker()
    if tracker is not None and hasattr(tracker, "get_states"):
        for name, per_dev in tracker.get_states().items():  # {name: {"cpu": t, "device": t}}
            for dev, t in per_dev.items():
                out[f"tracker_{name}__{dev}"] = t.clone()
    return out


def rng_chunks(rank: int, tensors: Optional[Dict[str, torch.Tensor]] = None) -> List[Chunk]:
    tensors = rng_tensors() if tensors is None else tensors
    return [Chunk(f"{RNG_PREFIX}{rank}/{k}", tuple(v.shape), (0,) * v.dim(), v) for k, v in tensors.items()]


def restore_rng(tensors: Dict[str, torch.Tensor]) -> None:
    from .. import platform

    platform.set_rng_state({k[len("torch_"):]: v for k, v in tensors.items() if k.startswith("torch_")})
    st = tensors["python_state"].tolist()
    has, val = tensors["python_gauss"].tolist()
    random.setstate((int(st[0]), tuple(int(x) for x in st[1:]), val if has else None))
    if "numpy_keys" in tensors:
        import numpy as np
        pos, has_gauss = tensors["numpy_pos"].tolist()
        np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                             float(tensors["numpy_gauss"].item())))
    tracker = _tracker()
    states: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("tracker_"):
            name, dev = k[len("tracker_"):].rsplit("__", 1)
            states.setdefault(name, {})[dev] = v
    if tracker is not None and states and hasattr(tracker, "set_states"):
        tracker.set_states(states)

