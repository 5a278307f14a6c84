"""Model-state memory per rank: measured from the live tensors, and the analytic figure the planner uses.

Model state = model params + grad buffers + fp32 main params + optimizer states (activations excluded).
Per parameter, with fp32 grads and Adam (two fp32 states), d = the sharding group (dp x cp for dense
params, expert-dp for expert params):

    setting                          params  grads  main params  Adam states   total
    fp32, no distributed optimizer      4      4        0            8          16
    fp32, distributed optimizer         4      4        0           8/d       8 + 8/d
    bf16/fp16, no distributed opt.      2      4        4            8          18
    bf16/fp16, distributed optimizer    2      4       4/d          8/d       6 + 12/d

(fp32 params are their own main params; the distributed optimizer keeps the full grad buffer and the
full model params, and shards only main params and states.) ``model_state_bytes`` reads the bytes of the
distinct storages behind the tensors, so buffer padding shows up in the measurement and is also reported
on its own.
"""
from __future__ import annotations

from typing import Dict


def _chunks(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def model_state_bytes(model, optimizer) -> Dict[str, int]:
    """Bytes held on this rank, from the tensors: {'params', 'grads', 'main_params', 'optimizer_states',
    'total', 'padding'} (padding: bytes of buffer padding, already inside params and grads)."""
    seen = set()

    def nbytes(t) -> int:
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()

    out = {"params": 0, "grads": 0, "main_params": 0, "optimizer_states": 0, "padding": 0}
    for ddp in _chunks(model):
        for p in ddp.module.parameters():
            if p.requires_grad:
                out["params"] += nbytes(p)
        for buf in ddp.grad_buffers:
            out["grads"] += nbytes(buf.grad_data)
            pad = buf.numel - buf.numel_unpadded
            out["padding"] += pad * buf.grad_data.element_size()
            if buf.param_data is not None:
                out["padding"] += pad * buf.param_data.element_size()
    for e in optimizer.entries:
        out["main_params"] += nbytes(e.main_param)
    if optimizer.inner is not None:
        for st in optimizer.inner.state.values():
            for k, v in st.items():
                if k != "step" and hasattr(v, "untyped_storage"):
                    out["optimizer_states"] += nbytes(v)
    out["total"] = out["params"] + out["grads"] + out["main_params"] + out["optimizer_states"]
    return out


def analytic_model_state_bytes(num_dense_params: int, num_expert_params: int, dp: int, edp: int, bf16: bool,
                               distributed: bool, grad_bytes: int = 4, optimizer: str = "adam") -> Dict[str, float]:
    """The table above for this rank's local param counts (bf16 means any 16-bit param dtype)."""
    if dp < 1 or edp < 1:
        raise ValueError(f"dp {dp} and edp {edp} must be >= 1")
    n = num_dense_params + num_expert_params
    sharded = num_dense_params / dp + num_expert_params / edp if distributed else n
    states_per = {"adam": 8, "sgd": 0}
    if optimizer not in states_per:
        raise ValueError(f"optimizer {optimizer!r} is unknown; use adam or sgd")
    out = {"params": (2 if bf16 else 4) * n, "grads": grad_bytes * n,
           "main_params": (4 * sharded) if bf16 else 0, "optimizer_states": states_per[optimizer] * sharded}
    out["total"] = out["params"] + out["grads"] + out["main_params"] + out["optimizer_states"]
    return out
