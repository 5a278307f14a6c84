"""Activation recomputation: apply a TrainingConfig's recompute settings to model chunks, and measure the
bytes saved for backward.

    apply_recompute(chunks, train_cfg)      # or apply_recompute(chunks, granularity=..., method=..., ...)

* ``full`` + ``uniform``: this chunk's layers (its own ``layer_ids``, so it works per pipeline stage) are split
  into groups of ``recompute_num_layers``; each group is one checkpoint (only its input is kept).
* ``full`` + ``block``: the first ``recompute_num_layers`` layers of the chunk are checkpointed one by one, the
  rest keep their activations.
* ``full`` also checkpoints each MTP depth (the MTP block is a full decoder layer) on the chunk that holds it.
* ``selective`` with ``recompute_modules`` (config.RECOMPUTE_MODULES): ``core_attn`` (softmax(QK^T)V),
  ``mla_up_proj`` (q_b / kv_b projections + RoPE, output-discarding: q, k, v are dropped once core attention
  has saved them and rebuilt once from the latents for its backward), ``layernorm`` (the two pre-norms,
  output-discarding: the norm output, and every view of it its consumer keeps, is dropped and recomputed from
  the norm input when backward needs it),
  ``mlp`` (the dense MLP), ``moe`` (the whole MoE block); ``moe_act`` and ``shared_experts`` are applied inside
  the MoE block and need ``MoELayer.supports_recompute`` to list them (a ConfigError says so otherwise); with
  ``moe`` also selected they are subsumed by the whole-block checkpoint. DeepSeek-V4 layers take ``layernorm``,
  ``moe``, ``mhc`` (the stream-mixing coefficients, models/deepseek_v4/layer.py) and what their attention lists
  in ``supports_recompute`` (``core_attn``, ``mla_up_proj``: the query up-projection); a module the model does
  not have (``mlp`` on V4, ``mhc`` on V3) is a ConfigError naming the model's modules. Decoder layers are found
  by their base class (models/chunk.DecoderLayerBase) and say which names they act on (``layer_recompute``).

Every checkpoint is ``tensor_parallel.random.checkpoint``: torch's non-reentrant checkpoint with the CPU /
accelerator RNG and the RNG-tracker states restored, so recomputed activations are bitwise the forward ones
(the MoE router sees the same input and takes the same top-k; collectives inside re-run in graph order).

``SavedTensorMeter`` counts the bytes autograd saves for backward (saved-tensor hooks; parameters and views
of parameters excluded, storages deduplicated; checkpoint inputs included), per decoder layer, plus the device
allocator delta from ``platform.memory_stats`` (on CPU that figure is the process RSS and only indicative).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import platform
from .config import ConfigError, TrainingConfig, check_recompute
from .tensor_parallel import random as tp_random

_MOE_INTERNAL = ("moe_act", "shared_experts")


def _chunks(chunks) -> List[nn.Module]:
    if isinstance(chunks, nn.Module):
        return [chunks]
    return list(chunks)


def _decoder_layers(chunk: nn.Module):
    from .models.chunk import DecoderLayerBase
    return [m for m in chunk.modules() if isinstance(m, DecoderLayerBase)]


def _attention_modules(layer) -> frozenset:
    """The selective names the layer's attention acts on: its ``supports_recompute``, else MLA's and V4's two."""
    return frozenset(getattr(layer.self_attn, "supports_recompute", ("core_attn", "mla_up_proj")))


def apply_recompute(chunks: Union[nn.Module, Sequence[nn.Module]], train: Optional[TrainingConfig] = None, *,
                    granularity: Optional[str] = None, method: Optional[str] = None,
                    num_layers: Optional[int] = None, modules: Iterable[str] = ()) -> None:
    """Configure recompute on every model chunk (a DeepseekForCausalLM or a list of them, e.g. virtual stages).
    Calling it again replaces the previous setting; ``granularity=None`` turns recompute off."""
    if train is not None:  # validated (and defaulted) when the TrainingConfig was built
        granularity, method = train.recompute_granularity, train.recompute_method
        num_layers, modules = train.recompute_num_layers, train.recompute_modules
    else:
        modules = check_recompute(granularity, method, num_layers, modules)
    for chunk in _chunks(chunks):
        ids = list(chunk.layer_ids)
        plan: List[List[int]] = []
        if granularity == "full" and method == "uniform":
            plan = [ids[i:i + num_layers] for i in range(0, len(ids), num_layers)]
        elif granularity == "full":
            plan = [[i] for i in ids[:num_layers]]
        chunk.recompute_chunks = plan
        chunk.recompute_mtp = granularity == "full"
        selected = frozenset(modules) if granularity == "selective" else frozenset()
        layers = _decoder_layers(chunk)
        if selected and layers:
            known = frozenset(_MOE_INTERNAL)
            for layer in layers:
                known |= frozenset(type(layer).layer_recompute) | _attention_modules(layer)
            unknown = selected - known
            if unknown:
                raise ConfigError(f"--recompute-modules {' '.join(sorted(unknown))} do not exist in "
                                  f"{chunk.config.model_type} (its modules: {' '.join(sorted(known))}); drop them")
        for layer in layers:
            layer.recompute_modules = selected & frozenset(type(layer).layer_recompute)
            layer.self_attn.recompute_modules = selected & _attention_modules(layer)
            inner = selected & frozenset(_MOE_INTERNAL)
            if layer.is_moe:
                supported = frozenset(getattr(layer.mlp, "supports_recompute", ()))
                missing = inner - supported
                if missing:
                    raise ConfigError(f"--recompute-modules {' '.join(sorted(missing))} must be applied inside the MoE "
                                      f"block, and {type(layer.mlp).__name__} does not support it; drop them or use "
                                      f"'moe' (recompute the whole MoE block)")
                if supported:
                    # under 'moe' the whole block is one checkpoint: checkpoints inside it would only keep the
                    # original forward's gate/up alive, so the inner modules are subsumed
                    layer.mlp.recompute_modules = frozenset() if "moe" in layer.recompute_modules else inner


# ------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    """((storage address, storage bytes), storage bytes); tensors without a storage count their own bytes."""
    try:
        st = t.untyped_storage()
        return (st.data_ptr(), st.nbytes()), st.nbytes()
    except (RuntimeError, NotImplementedError):
        n = t.numel() * t.element_size()
        return (id(t), n), n


class SavedTensorMeter:
    """Bytes saved for backward during a forward, per scope (decoder layer ``layer.{i}`` / ``mtp.{k}`` or
    ``other``).

        meter = SavedTensorMeter(model)
        with meter:
            out = model(ids, labels=labels)
        meter.total_bytes, meter.per_scope, meter.layer_bytes, meter.device_delta_bytes

    Counted: every tensor autograd saves, once per storage (a storage is counted whole, the first time any view
    of it is saved), except parameters: a parameter itself, a view of one (F.linear saves ``weight.t()``) and,
    when ``model`` is given, anything on a parameter's storage; plus the inputs kept by activation checkpoints.
    Memory is measured, not freed: use a fresh meter per forward.
    """

    def __init__(self, model: Optional[nn.Module] = None):
        self.model = model
        self.per_scope: Dict[str, int] = defaultdict(int)
        self._seen = set()
        self._param_keys = set()
        self._scope: List[str] = ["other"]
        self._handles = []
        self._stack = None
        self.device_delta_bytes = 0

    # scopes from forward hooks on decoder layers (no change to model code)
    def _install(self):
        if self.model is None:
            return
        from .models.chunk import DecoderLayerBase
        for name, m in self.model.named_modules():
            if isinstance(m, DecoderLayerBase):
                tag = name.replace("model.layers.", "layer.").replace("mtp.layers.", "mtp.")
                self._handles.append(m.register_forward_pre_hook(lambda mod, a, t=tag: self._push(t)))
                self._handles.append(m.register_forward_hook(lambda mod, a, o: self._pop()))

    def _push(self, tag: str) -> None:
        self._scope.append(tag)

    def _pop(self) -> None:
        self._scope.pop()

    def _is_parameter(self, t: torch.Tensor) -> bool:
        """A parameter, a view of one (F.linear saves ``weight.t()``, a view with a grad_fn), or any tensor on a
        parameter's storage (a model's parameters, when the meter was given the model)."""
        if isinstance(t, nn.Parameter):
            return True
        base = t._base
        if base is not None and (isinstance(base, nn.Parameter) or (base.requires_grad and base.grad_fn is None)):
            return True
        return bool(self._param_keys) and _storage_key(t)[0] in self._param_keys

    def record(self, t: torch.Tensor, kept_by_checkpoint: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or self._is_parameter(t):
            return
        if t.requires_grad and t.grad_fn is None and not kept_by_checkpoint:
            return  # a leaf input requiring grad: not an activation
        key, nbytes = _storage_key(t)
        if key in self._seen:  # each storage once, however many views of it are saved
            return
        self._seen.add(key)
        scope = self._scope[-1]
        if kept_by_checkpoint and scope == "other":
            scope = "checkpoint"  # the input of a full-recompute chunk of layers
        self.per_scope[scope] += nbytes

    def _pack(self, t):
        self.record(t)
        return t

    def __enter__(self):
        self._install()
        self._param_keys = set() if self.model is None else {
            _storage_key(p)[0] for p in self.model.parameters()}
        platform.synchronize()
        self._mem0 = platform.memory_stats().get("allocated", 0)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        tp_random.ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc):
        tp_random.ACTIVE_METERS.remove(self)
        self._stack.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        platform.synchronize()
        self.device_delta_bytes = platform.memory_stats().get("allocated", 0) - self._mem0
        return False

    @property
    def total_bytes(self) -> int:
        return sum(self.per_scope.values())

    @property
    def layer_bytes(self) -> int:
        """Bytes attributed to decoder layers and to the checkpoints wrapping them."""
        return sum(v for k, v in self.per_scope.items() if k != "other")
