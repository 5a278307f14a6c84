"""Mixed-precision optimizer with fp32 main params, optionally sharded over data-parallel ranks (ZeRO-1).

Owns: ``MegatronOptimizer`` and ``build_optimizer``. Model chunks must be wrapped in
``distributed.DistributedDataParallel``; the optimizer reads each chunk's grad buffers:

* main params: bf16 / fp16 model params get fp32 copies; fp32 (or fp64) params are updated in place (their
  "main param" is a view of the model param). Under the distributed optimizer (the DDP's
  ``use_distributed_optimizer``) a rank keeps main params and Adam states only for the contiguous shard of
  each bucket it owns (dense buckets shard over dp x cp, expert buckets over expert-dp), per param as the
  1-D slice ``param.view(-1)[start:end]`` of the owned range.
* step: finish the grad reduction of every chunk -> (fp16) unscale -> global grad norm across all groups
  (clip_grads.py) -> skip the step and count it if the norm is inf / nan (fp16: the loss scaler backs off;
  the trainer reports it with the ranks and ``nonfinite_grad_params()``, training/health.py)
  -> clip -> Adam(W) (decoupled weight decay as torch.optim.AdamW; no decay on 1-D params and ``*.bias``)
  -> copy main params into the model params -> all-gather the updated shards (distributed optimizer)
  -> post-step hooks. Module buffers (``requires_grad`` False tensors and registered buffers, e.g. the MoE
  router's ``e_score_correction_bias``) are never touched.
* flat Adam: main params, their grads and both Adam states live in flat contiguous buffers, one per run
  of params adjacent in a grad buffer ("segment"; without the distributed optimizer that is a whole grad
  buffer, with it each bucket's owned shard). fp32 params without the distributed optimizer are re-pointed
  into that flat main buffer (``param.data`` becomes a view, as the distributed optimizer's param buffer
  does); the per-param ``main_param`` / states are views of the flats. The update is one fused
  ``torch._fused_adamw_`` call per param group over the segments' decay / no-decay sub-ranges (a handful of
  large tensors instead of a loop over params); where the fused kernel is unavailable, the same math as
  torch's foreach AdamW with ``torch._foreach_*`` ops over those sub-ranges. Same update rule as
  torch.optim.AdamW (tests compare with it); ``torch.optim.AdamW`` is kept as ``inner`` for its
  ``param_groups`` (the LR scheduler writes ``lr`` there) and ``state`` (views, the checkpoint contract).
* post-step hooks run only after a successful step. The trainer passes
  ``post_step_hooks=[lambda: moe.update_expert_bias(model, groups, rate)]`` (or registers it once with
  ``register_post_step_hook``) so the aux-loss-free bias update sees the loads of a step that was applied.
* LR: ``param_groups`` are torch's; ``OptimizerParamScheduler`` (lr_scheduler.py) sets their ``lr``. The
  trainer calls ``scheduler.step(1)`` only when ``step()`` returned ``update_successful`` (as Megatron).

Checkpoint, the path the checkpointing package uses (checkpointing/state.py's contract):
``sharded_param_state()`` -> [(model param, {"main_param", "exp_avg", "exp_avg_sq": live 1-D (or, without
the distributed optimizer, local-shaped) tensors}, flat_range (start, end) or None)], written in place by a
load; ``state_dict_common()`` / ``load_state_dict_common(d)`` for the JSON part (Adam step count, skipped
steps, loss scaler, param-group hyper-parameters). torch.distributed.checkpoint then reshards at any layout
by cutting each flat range into boxes of the global tensor.

Self-contained structure (``state_dict()``), the same with and without the distributed optimizer::

    {"common": {"optimizer": "adam", "step": int, "num_skipped_steps": int, "grad_scaler": dict | None,
                "param_groups": [{"name": "decay" | "no_decay", "lr", "weight_decay", "betas", "eps"}],
                "distributed": bool},
     "param_state": {param_name: {"main_param": T, "exp_avg": T, "exp_avg_sq": T}},  # owned params only
     "shard_info":  {param_name: {"local_shape", "flat_range": (start, end), "global_shape",
                                  "global_offset", "split_dims": {dim: (group, index, size)},
                                  "is_expert", "dp_group": "dp_cp" | "edp", "dp_rank", "dp_size",
                                  "distributed"}}}

Every tensor ``T`` in param_state is 1-D, fp32 (fp64 for fp64 params), and equals
``X_local.view(-1)[start:end]`` where ``X_local`` is that state for this rank's local (TP / EP) shard of the
param, of shape ``local_shape``; that local shard sits at ``global_offset`` in the ``global_shape`` tensor
(the param's ShardSpec). Without the distributed optimizer ``flat_range`` is ``(0, numel)``. The tensors
are live references (clone before mutating). Param names are the DDP-wrapped modules' ``named_parameters``
(layout independent). For a checkpoint that reshards at any layout, ``full_param_state()`` (a collective
over dp / expert-dp) returns each state as the whole local-shaped tensor (a box in the global tensor,
replicated over dp, so torch.distributed.checkpoint can save it with ``global_offset`` and dedup the
replicas), and ``load_full_param_state()`` takes the same form at the new layout and keeps each rank's
range. ``load_state_dict`` takes the sharded form saved at the same layout only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..distributed.ddp import DistributedDataParallel
from ..distributed.grad_buffer import GradBuffer, _all_gather
from ..tensor_parallel.sharding import shard_spec
from .clip_grads import clip_grads_, count_zeros, counts_in_grad_norm, global_grad_norm
from .grad_scaler import DynamicGradScaler

_HALF = (torch.bfloat16, torch.float16)
_FUSED_OK: Dict[str, bool] = {}  # device type -> False once torch._fused_adamw_ refused it
STATE_KEYS = ("main_param", "exp_avg", "exp_avg_sq")


@dataclass
class _Entry:
    name: str
    param: nn.Parameter
    ddp: DistributedDataParallel
    buffer: GradBuffer
    flat_range: Tuple[int, int]  # owned [start, end) in param.view(-1)
    buf_range: Tuple[int, int]  # the same range in buffer offsets
    main_param: torch.Tensor  # leaf, fp32 (or the param's dtype when that is fp32 / fp64)
    grad_view: torch.Tensor  # view of the grad buffer, same shape as main_param
    model_view: torch.Tensor  # view of the model param data, same shape as main_param
    counted: bool  # counted in the global grad norm on this rank
    decay: bool


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() <= 1 or name.endswith(".bias")


class MegatronOptimizer:
    def __init__(self, model_chunks: Sequence[DistributedDataParallel], opt_cfg, groups,
                 log_num_zeros_in_grad: bool = False,
                 post_step_hooks: Optional[List[Callable[[], None]]] = None):
        self.chunks = list(model_chunks)
        self.cfg, self.groups = opt_cfg, groups
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        self.post_step_hooks: List[Callable[[], None]] = list(post_step_hooks or [])
        self.distributed = self.chunks[0].use_distributed_optimizer
        self.num_skipped_steps = 0
        self.entries: List[_Entry] = []
        self._entry_of: Dict[int, _Entry] = {}
        self._names: Dict[int, str] = {}
        seen = set()
        for ddp in self.chunks:
            for n, p in ddp.module.named_parameters():
                if not p.requires_grad:
                    continue
                if n in seen:
                    raise ValueError(f"parameter name {n!r} appears in two model chunks; chunk modules must "
                                     f"register layers under their global index so names are unique")
                seen.add(n)
                self._names[id(p)] = n
                self._add_param(n, p, ddp)
        self.device = self.chunks[0].grad_buffers[0].grad_data.device if self.chunks[0].grad_buffers else \
            torch.device("cpu")

        model_dtypes = {buf.param_dtype for ddp in self.chunks for buf in ddp.grad_buffers}
        self._norm_dtype = torch.float64 if torch.float64 in model_dtypes else torch.float32
        if opt_cfg.fp16:
            self.grad_scaler = DynamicGradScaler(opt_cfg.initial_loss_scale, opt_cfg.min_loss_scale,
                                                 growth_interval=opt_cfg.loss_scale_window,
                                                 hysteresis=opt_cfg.hysteresis)
        else:
            self.grad_scaler = None
        half = {e.param.dtype for e in self.entries} & set(_HALF)
        if torch.float16 in half and not opt_cfg.fp16:
            raise ValueError("model has float16 params but --fp16 is not set; pass --fp16 (dynamic loss "
                             "scaling) or use --bf16")

        groups_ = []
        for gname, decay in (("decay", True), ("no_decay", False)):
            ps = [e.main_param for e in self.entries if e.decay == decay]
            if ps:
                groups_.append({"params": ps, "name": gname,
                                "weight_decay": opt_cfg.weight_decay if decay else 0.0})
        if not groups_:
            self.inner = None
        elif opt_cfg.optimizer == "adam":
            self.inner = torch.optim.AdamW(groups_, lr=opt_cfg.lr, betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
                                           eps=opt_cfg.adam_eps, weight_decay=opt_cfg.weight_decay)
            self._build_flat()  # eager states: measurable memory and a complete state_dict from step 0
        elif opt_cfg.optimizer == "sgd":
            self.inner = torch.optim.SGD(groups_, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
        else:
            raise ValueError(f"--optimizer {opt_cfg.optimizer!r} is unknown; use adam or sgd")
        self._steps = 0

    def _build_flat(self) -> None:
        """Flat main / grad / state buffers per segment and the per-group sub-ranges the fused update runs on."""
        order = sorted(self.entries, key=lambda e: (id(e.buffer), e.buf_range[0]))
        segments: List[List[_Entry]] = []
        for e in order:
            last = segments[-1][-1] if segments else None
            if last is not None and last.buffer is e.buffer and last.buf_range[1] == e.buf_range[0] and \
                    last.main_param.dtype == e.main_param.dtype:
                segments[-1].append(e)
            else:
                segments.append([e])
        self._step_t: Dict[torch.device, torch.Tensor] = {}
        self._runs: Dict[int, List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._grad_casts: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (fp32 flat grad, grad-buffer view)
        group_of = {g["name"] == "decay": gi for gi, g in enumerate(self.inner.param_groups)}
        for seg in segments:
            buf, a, b = seg[0].buffer, seg[0].buf_range[0], seg[-1].buf_range[1]
            dev, mdtype = seg[0].main_param.device, seg[0].main_param.dtype
            if dev not in self._step_t:
                self._step_t[dev] = torch.zeros((), dtype=torch.float32, device=dev)
            step_t = self._step_t[dev]
            if buf.param_data is not None and buf.param_data.dtype == mdtype:
                main = buf.param_data[a:b]  # distributed fp32: the main params already are this flat view
            else:
                main = torch.empty(b - a, dtype=mdtype, device=dev)
            grad_src = buf.grad_data[a:b]
            grad = grad_src if grad_src.dtype == mdtype else torch.empty(b - a, dtype=mdtype, device=dev)
            if grad is not grad_src:
                self._grad_casts.append((grad, grad_src))
            m, v = torch.zeros_like(main), torch.zeros_like(main)
            for e in seg:
                lo, hi = e.buf_range[0] - a, e.buf_range[1] - a
                shape = e.main_param.shape
                mv = main[lo:hi].view(shape)
                if mv.data_ptr() != e.main_param.data_ptr():
                    mv.copy_(e.main_param)
                    if e.main_param.data_ptr() == e.model_view.data_ptr():
                        e.param.data = mv  # fp32 without the distributed optimizer: re-point the model param
                        e.model_view = e.param.data
                    e.main_param = mv
                e.main_param.grad = grad[lo:hi].view(shape)
                if grad is not grad_src:
                    e.grad_view = grad_src[lo:hi].view(shape)
                self.inner.state[e.main_param] = {"step": step_t, "exp_avg": m[lo:hi].view(shape),
                                                  "exp_avg_sq": v[lo:hi].view(shape)}
            # sub-ranges of one param group each (decay flags alternate along the buffer)
            start = 0
            for i, e in enumerate(seg):
                end = seg[i + 1].buf_range[0] - a if i + 1 < len(seg) else b - a
                nxt = seg[i + 1] if i + 1 < len(seg) else None
                if nxt is None or nxt.decay != e.decay:
                    gi = group_of[e.decay]
                    self._runs.setdefault(gi, []).append((main[start:end], grad[start:end], m[start:end],
                                                          v[start:end]))
                    start = end
        # the param groups hold the (re-created) main params: keep them in sync with the entries
        for gi, g in enumerate(self.inner.param_groups):
            decay = g["name"] == "decay"
            g["params"] = [e.main_param for e in self.entries if e.decay == decay]

    def _fused_clip_ok(self) -> bool:
        """Clip inside the fused kernel (its grad_scale divides the grads on the fly and stores them back, so
        the main grads end clipped as with a separate pass): adam, fp32 / half main params (the kernel takes
        an fp32 factor; fp64 models clip in a separate pass so the factor stays exact), kernel available."""
        return (self.cfg.optimizer == "adam" and self.inner is not None and hasattr(torch, "_fused_adamw_")
                and all(_FUSED_OK.get(t.device.type, True) and t.dtype != torch.float64
                        for runs in self._runs.values() for t, _, _, _ in runs))

    def _adam_step(self, clip_coeff: Optional[float] = None) -> None:
        """AdamW over the flat sub-ranges: torch._fused_adamw_ per param group, else torch._foreach_* ops.
        ``clip_coeff``: scale the grads by it first (only given when ``_fused_clip_ok()``)."""
        step = float(self._steps + 1)
        for t in self._step_t.values():
            t.fill_(step)
        scale = {dev: torch.full((), 1.0 / clip_coeff, dtype=torch.float32, device=dev)
                 for dev in self._step_t} if clip_coeff is not None else {}
        for gi, runs in self._runs.items():
            g = self.inner.param_groups[gi]
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            ps, gs, ms, vs = (list(x) for x in zip(*runs))
            dev = ps[0].device
            if _FUSED_OK.get(dev.type, True) and hasattr(torch, "_fused_adamw_"):
                try:
                    torch._fused_adamw_(ps, gs, ms, vs, [], [self._step_t[dev]] * len(ps), lr=lr, beta1=b1,
                                        beta2=b2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                                        grad_scale=scale.get(dev))
                    continue
                except (RuntimeError, NotImplementedError):  # no fused kernel for this device / dtype
                    _FUSED_OK[dev.type] = False
            if dev in scale:  # only reached if the kernel refused after _fused_clip_ok() said yes
                torch._foreach_mul_(gs, clip_coeff)
            if wd != 0.0:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
            step_size = lr / (1 - b1 ** step)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, (1 - b2 ** step) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, -step_size)

    # -- construction ----------------------------------------------------------------------------------
    def _add_param(self, name: str, p: nn.Parameter, ddp: DistributedDataParallel) -> None:
        buf = ddp.buffer_of(p)
        slot = buf.slots[id(p)]
        if self.distributed:
            a, b = buf.bucket_of(p).shard_range()
            a, b = max(a, slot.start), min(b, slot.end)
            if a >= b:
                return  # another rank of the group owns all of this param
            flat = (a - slot.start, b - slot.start)
            grad_view = buf.grad_data[a:b]
            model_view = buf.param_data[a:b]
        else:
            a, b, flat = slot.start, slot.end, (0, p.numel())
            grad_view = p.main_grad
            model_view = p.data
        if p.dtype in _HALF:
            main = model_view.detach().to(torch.float32).clone()
        else:
            main = model_view.detach()  # updated in place: shares the model param's storage
        if grad_view.dtype == main.dtype:
            main.grad = grad_view
        e = _Entry(name, p, ddp, buf, flat, (a, b), main, grad_view, model_view,
                   counts_in_grad_norm(p, self.groups, self.distributed), not _no_weight_decay(name, p))
        self.entries.append(e)
        self._entry_of[id(p)] = e

    # -- torch-like surface ----------------------------------------------------------------------------
    @property
    def param_groups(self) -> List[Dict]:
        return [] if self.inner is None else self.inner.param_groups

    def register_post_step_hook(self, fn: Callable[[], None]) -> None:
        self.post_step_hooks.append(fn)

    def get_loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.grad_scaler is None else loss * self.grad_scaler.scale

    def zero_grad(self) -> None:
        for ddp in self.chunks:
            ddp.zero_grad_buffer()

    # -- the step --------------------------------------------------------------------------------------
    def _main_grads(self, counted_only: bool = False) -> List[torch.Tensor]:
        return [e.main_param.grad for e in self.entries if not counted_only or e.counted]

    @torch.no_grad()
    def nonfinite_grad_params(self, limit: int = 3) -> List[str]:
        """Names of the first ``limit`` params whose gradient (this rank's part, after the reduction and
        unscaling of the last ``step``) holds an inf or nan: the NaN report (training/health.py) calls it when
        ``step`` skipped an update for a non-finite grad norm. Empty when every local grad is finite."""
        out = []
        for e in self.entries:
            g = e.main_param.grad if e.main_param.grad is not None else e.grad_view
            if g is not None and g.numel() and not bool(torch.isfinite(g).all()):
                out.append(e.name)
                if len(out) >= limit:
                    break
        return out

    def get_grad_norm(self) -> float:
        return global_grad_norm(self._main_grads(counted_only=True), self.groups, self.device, self._norm_dtype)

    @torch.no_grad()
    def step(self, post_step_hooks: Optional[List[Callable[[], None]]] = None
             ) -> Tuple[bool, float, Optional[int]]:
        """One update. Returns (update_successful, grad_norm, num_zeros_in_grad or None)."""
        for ddp in self.chunks:
            ddp.finish_grad_sync()
        if self.cfg.optimizer == "adam" and self.inner is not None:
            for flat, src in self._grad_casts:  # e.g. bf16 grad buffer -> the fp32 flat grads, one copy each
                flat.copy_(src)
        else:
            for e in self.entries:
                if e.grad_view.dtype != e.main_param.dtype:
                    e.main_param.grad = e.grad_view.to(e.main_param.dtype)
        grads = self._main_grads()
        if self.grad_scaler is not None and grads:
            torch._foreach_mul_(grads, 1.0 / self.grad_scaler.scale)
        grad_norm = self.get_grad_norm()
        found_inf = not (grad_norm == grad_norm and grad_norm != float("inf"))
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        if found_inf:
            self.num_skipped_steps += 1
            return False, grad_norm, None
        num_zeros = count_zeros(self._main_grads(True), self.groups, self.device) \
            if self.log_num_zeros_in_grad else None  # (scaling by the clip factor keeps zeros zero)
        clip_coeff = None
        if self.cfg.clip_grad > 0.0:
            coeff = self.cfg.clip_grad / (grad_norm + 1.0e-6)
            if coeff < 1.0 and self._fused_clip_ok():
                clip_coeff = coeff  # applied by the fused kernel as it reads the grads (and written back)
            else:
                clip_grads_(grads, self.cfg.clip_grad, grad_norm)
        if self.inner is not None:
            if self.cfg.optimizer == "adam":
                self._adam_step(clip_coeff)
            else:
                self.inner.step()
        self._steps += 1
        self._copy_main_to_model()
        for fn in list(self.post_step_hooks) + list(post_step_hooks or []):
            fn()
        return True, grad_norm, num_zeros

    def _copy_main_to_model(self) -> None:
        for e in self.entries:
            if e.main_param.data_ptr() != e.model_view.data_ptr():
                e.model_view.copy_(e.main_param)
        for ddp in self.chunks:
            ddp.start_param_sync()

    # -- checkpoint ------------------------------------------------------------------------------------
    def _state_of(self, e: _Entry) -> Dict[str, torch.Tensor]:
        out = {"main_param": e.main_param.reshape(-1)}
        st = self.inner.state.get(e.main_param, {}) if self.inner is not None else {}
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                out[k] = st[k].reshape(-1)
        return out

    def shard_info(self) -> Dict[str, Dict]:
        """Per param (owned or not): where this rank's optimizer range sits (see the module docstring)."""
        info = {}
        for ddp in self.chunks:
            for buf in ddp.grad_buffers:
                for p in buf.params:
                    name = self._names[id(p)]
                    e = self._entry_of.get(id(p))
                    spec = shard_spec(p)
                    local = tuple(p.shape)
                    info[name] = {
                        "local_shape": local, "flat_range": e.flat_range if e else (0, 0),
                        "global_shape": spec.global_shape(local), "global_offset": spec.offsets(local),
                        "split_dims": dict(spec.axes), "is_expert": buf.is_expert, "dp_group": buf.group_name,
                        "dp_rank": buf.group_rank, "dp_size": buf.group_size, "distributed": self.distributed}
        return info

    def _common(self) -> Dict:
        pgs = [{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in g.items() if k != "params"}
               for g in self.param_groups]
        return {"optimizer": self.cfg.optimizer, "step": self._steps, "num_skipped_steps": self.num_skipped_steps,
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
                "param_groups": pgs, "distributed": self.distributed}

    def sharded_param_state(self) -> List[Tuple[nn.Parameter, Dict[str, torch.Tensor], Optional[Tuple[int, int]]]]:
        """(model param, {state key: live 1-D tensor}, flat_range) per owned param: the checkpointing
        package's contract (checkpointing/state.py). flat_range is None when the tensors cover the whole
        local param (no distributed optimizer), else (start, end) of the row-major flattened local param.
        Loading writes into these tensors in place."""
        return [(e.param, self._state_of(e), e.flat_range if self.distributed else None) for e in self.entries]

    def state_dict_common(self) -> Dict:
        """The non-tensor state (JSON-serialisable)."""
        c = self._common()
        c["param_groups"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                             for g in c["param_groups"]]
        return c

    def load_state_dict_common(self, common: Dict) -> None:
        self._load_common(common)

    @property
    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale, or None when no loss scaling is in use."""
        return None if self.grad_scaler is None else self.grad_scaler.scale

    def state_dict(self) -> Dict:
        return {"common": self._common(),
                "param_state": {e.name: self._state_of(e) for e in self.entries},
                "shard_info": self.shard_info()}

    def _load_common(self, common: Dict) -> None:
        self._steps = int(common["step"])
        self.num_skipped_steps = int(common.get("num_skipped_steps", 0))
        if self.grad_scaler is not None and common.get("grad_scaler"):
            self.grad_scaler.load_state_dict(common["grad_scaler"])
        if self.inner is not None:
            for e in self.entries:
                st = self.inner.state.get(e.main_param)
                if st is not None and "step" in st:
                    st["step"].fill_(float(self._steps))
        for g, saved in zip(self.param_groups, common.get("param_groups", [])):
            for k in ("lr", "weight_decay"):
                if k in saved:
                    g[k] = saved[k]

    @torch.no_grad()
    def _load_entry(self, e: _Entry, states: Dict[str, torch.Tensor], full: bool) -> None:
        a, b = e.flat_range if full else (0, e.flat_range[1] - e.flat_range[0])
        own = self._state_of(e)
        for k, dst in own.items():
            if k not in states:
                raise KeyError(f"optimizer state for {e.name!r} has no {k!r}; the checkpoint was saved by a "
                               f"different optimizer (got keys {sorted(states)})")
            src = states[k].reshape(-1)
            if src.numel() < b:
                raise ValueError(f"optimizer state {e.name}.{k} has {src.numel()} elements, need {b}; the "
                                 f"checkpoint does not match this model")
            dst.copy_(src[a:b])

    @torch.no_grad()
    def load_state_dict(self, sd: Dict) -> None:
        """Load the sharded form saved at the same layout (collective under the distributed optimizer: the
        model params are re-synced from the main params)."""
        info = sd["shard_info"]
        for e in self.entries:
            saved = info.get(e.name)
            if saved is None or tuple(saved["flat_range"]) != e.flat_range or \
                    tuple(saved["local_shape"]) != tuple(e.param.shape):
                raise ValueError(f"optimizer state of {e.name!r} was saved with shard {saved and saved['flat_range']}"
                                 f" / shape {saved and saved['local_shape']}, this rank owns {e.flat_range} of "
                                 f"{tuple(e.param.shape)}: the layout changed; load it with "
                                 f"load_full_param_state(full_param_state_at_new_layout)")
            self._load_entry(e, sd["param_state"][e.name], full=False)
        self._load_common(sd["common"])
        self._copy_main_to_model()

    @torch.no_grad()
    def full_param_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each param's states as whole local-shaped tensors (collective over dp / expert-dp)."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for ddp in self.chunks:
            for buf in ddp.grad_buffers:
                for bucket in buf.buckets:
                    self._gather_bucket(buf, bucket, out)
        return out

    def _gather_bucket(self, buf, bucket, out) -> None:
        present = [self._entry_of[id(p)] for p in bucket.params if id(p) in self._entry_of]
        keys = STATE_KEYS if self.cfg.optimizer == "adam" else ("main_param",)
        dtype = present[0].main_param.dtype if present else (
            torch.float32 if buf.param_dtype in _HALF else buf.param_dtype)
        if self.distributed and buf.group_size > 1:
            for k in keys:
                flat = torch.zeros(bucket.numel, dtype=dtype, device=buf.grad_data.device)
                for e in present:
                    a, b = e.buf_range
                    flat[a - bucket.start:b - bucket.start].copy_(self._state_of(e)[k])
                s0, s1 = bucket.shard_range()
                _all_gather(flat, flat[s0 - bucket.start:s1 - bucket.start].clone(), group=buf.group)
                for p in bucket.params:
                    sl = buf.slots[id(p)]
                    name = self._names[id(p)]
                    out.setdefault(name, {})[k] = flat[sl.start - bucket.start:sl.end - bucket.start] \
                        .view(p.shape).clone()
        else:
            for e in present:
                out[e.name] = {k: v.view(e.param.shape).clone() for k, v in self._state_of(e).items()}

    @torch.no_grad()
    def load_full_param_state(self, full: Dict[str, Dict[str, torch.Tensor]], common: Optional[Dict] = None) -> None:
        """Load states given as whole local-shaped tensors of the *current* layout (e.g. read back with
        torch.distributed.checkpoint at this rank's global_offset); keeps this rank's range."""
        for e in self.entries:
            if e.name not in full:
                raise KeyError(f"no optimizer state for parameter {e.name!r} in the loaded state")
            self._load_entry(e, full[e.name], full=True)
        if common is not None:
            self._load_common(common)
        self._copy_main_to_model()


def build_optimizer(model_chunks, opt_cfg, groups, distributed: Optional[bool] = None,
                    log_num_zeros_in_grad: bool = False,
                    post_step_hooks: Optional[List[Callable[[], None]]] = None) -> MegatronOptimizer:
    """``model_chunks``: one DistributedDataParallel or a list (one per virtual pipeline chunk).
    ``distributed`` (optional) must agree with the chunks' ``use_distributed_optimizer``."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if not chunks:
        raise ValueError("build_optimizer got no model chunks")
    for i, c in enumerate(chunks):
        if not isinstance(c, DistributedDataParallel):
            raise TypeError(f"model chunk {i} is a {type(c).__name__}; wrap each chunk in "
                            f"megatron_ascend.distributed.DistributedDataParallel before build_optimizer")
    flags = {c.use_distributed_optimizer for c in chunks}
    if len(flags) != 1:
        raise ValueError("model chunks disagree on use_distributed_optimizer; build every chunk's "
                         "DistributedDataParallel with the same value")
    if distributed is not None and distributed != chunks[0].use_distributed_optimizer:
        raise ValueError(f"build_optimizer(distributed={distributed}) but the DDP chunks were built with "
                         f"use_distributed_optimizer={chunks[0].use_distributed_optimizer}; pass the same "
                         f"--use-distributed-optimizer to both")
    return MegatronOptimizer(chunks, opt_cfg, groups, log_num_zeros_in_grad, post_step_hooks)
