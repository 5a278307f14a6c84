"""Point-to-point transfer of activations (forward, to the next stage) and their grads (backward, to the
previous stage) between neighbouring pipeline ranks.

Shapes and dtypes are agreed up front: unless the caller fixes one ``tensor_shape`` / ``dtype`` for the whole
step, every transfer first sends a small int64 header (ndim, dtype code, dims) and then the payload, so
microbatches of different sequence lengths (SFT) need no padding. Grads travel with their own header too, so
the receiver never has to remember which activation a grad belongs to.

One call of ``communicate`` is one combined step of the schedule (Megatron's send_forward_recv_backward and
friends): its ops go out as one ``batch_isend_irecv`` group, headers first, then payloads. Ops are listed
forward direction first (send to next, recv from prev), then backward (send to prev, recv from next), and each
kind has its own tag, so the stream of messages on every (sender, receiver) channel is matched in order even
when prev == next (PP = 2 with virtual stages). Received tensors are waited for at once; sends are kept pending
(the tensor referenced, so it stays alive) and pruned when complete, with ``finish()`` waiting for the rest at
the end of the schedule. A rank therefore only ever blocks on data it needs.

Ranks wrap around (rank pp-1's next is rank 0): the interleaved schedule sends chunk v's output from the last
rank to chunk v+1 on the first. Non-interleaved schedules simply never send across the wrap.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..platform import get_platform

MAX_NDIM = 8
_HEADER_LEN = 2 + MAX_NDIM
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}

# tags: one stream per (direction, header/payload)
TAG_FWD_HEADER, TAG_FWD, TAG_BWD_HEADER, TAG_BWD = 11, 12, 21, 22


def encode_header(t: torch.Tensor, device) -> torch.Tensor:
    if t.dim() > MAX_NDIM:
        raise ValueError(f"pipeline p2p tensors may have at most {MAX_NDIM} dims; got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPE_CODE:
        raise ValueError(f"pipeline p2p cannot send dtype {t.dtype}; use one of {[str(d) for d in _DTYPES]}")
    h = [t.dim(), _DTYPE_CODE[t.dtype]] + list(t.shape) + [0] * (MAX_NDIM - t.dim())
    return torch.tensor(h, dtype=torch.int64, device=device)


def decode_header(h: torch.Tensor) -> Tuple[Tuple[int, ...], torch.dtype]:
    vals = h.tolist()
    ndim, code = int(vals[0]), int(vals[1])
    return tuple(int(x) for x in vals[2:2 + ndim]), _DTYPES[code]


class P2PCommunicator:
    """Send / receive to the neighbours of this rank in its pipeline group.

    ``tensor_shape`` and ``dtype`` (both or neither): every activation and grad of the step has this shape and
    dtype, and the header exchange is skipped. ``requires_grad``: received activations are marked as leaves
    that need grad (training); off for forward-only runs.
    """

    def __init__(self, groups, tensor_shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 device=None, requires_grad: bool = True):
        if (tensor_shape is None) != (dtype is None):
            raise ValueError(f"pass both tensor_shape and dtype to fix the p2p shape (got tensor_shape="
                             f"{tensor_shape}, dtype={dtype}), or neither to exchange shapes per transfer")
        ranks = groups.ranks["pp"]
        idx = groups.pp_rank
        self.group = groups.pp
        self.size = len(ranks)
        self.next_rank = ranks[(idx + 1) % self.size]
        self.prev_rank = ranks[(idx - 1) % self.size]
        self.fixed = (tuple(tensor_shape), dtype) if tensor_shape is not None else None
        self.device = device if device is not None else get_platform().device()
        self.requires_grad = requires_grad
        self._pending: List[Tuple[object, torch.Tensor]] = []

    # -- the one primitive -----------------------------------------------------------------
    def communicate(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                    recv_prev: bool = False, recv_next: bool = False
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send an activation to the next stage and/or a grad to the previous one; receive an activation
        from the previous stage and/or a grad from the next one. Returns (from_prev, from_next)."""
        if send_next is None and send_prev is None and not recv_prev and not recv_next:
            return None, None
        send_next = send_next.detach().contiguous() if send_next is not None else None
        send_prev = send_prev.detach().contiguous() if send_prev is not None else None
        if self.fixed is None:
            shape_prev, shape_next = self._exchange_headers(send_next, send_prev, recv_prev, recv_next)
        else:
            shape_prev = self.fixed if recv_prev else None
            shape_next = self.fixed if recv_next else None
        buf_prev = torch.empty(shape_prev[0], dtype=shape_prev[1], device=self.device) if recv_prev else None
        buf_next = torch.empty(shape_next[0], dtype=shape_next[1], device=self.device) if recv_next else None
        self._batch([(send_next, self.next_rank, TAG_FWD, True), (buf_prev, self.prev_rank, TAG_FWD, False),
                     (send_prev, self.prev_rank, TAG_BWD, True), (buf_next, self.next_rank, TAG_BWD, False)])
        if buf_prev is not None and self.requires_grad and buf_prev.is_floating_point():
            buf_prev.requires_grad_(True)
        return buf_prev, buf_next

    def _exchange_headers(self, send_next, send_prev, recv_prev, recv_next):
        h_next = encode_header(send_next, self.device) if send_next is not None else None
        h_prev = encode_header(send_prev, self.device) if send_prev is not None else None
        r_prev = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device) if recv_prev else None
        r_next = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device) if recv_next else None
        self._batch([(h_next, self.next_rank, TAG_FWD_HEADER, True), (r_prev, self.prev_rank, TAG_FWD_HEADER, False),
                     (h_prev, self.prev_rank, TAG_BWD_HEADER, True), (r_next, self.next_rank, TAG_BWD_HEADER, False)])
        return (decode_header(r_prev) if recv_prev else None), (decode_header(r_next) if recv_next else None)

    def _batch(self, ops) -> None:
        p2p_ops, kinds = [], []
        for tensor, peer, tag, is_send in ops:
            if tensor is None:
                continue
            p2p_ops.append(dist.P2POp(dist.isend if is_send else dist.irecv, tensor, peer, self.group, tag))
            kinds.append((is_send, tensor))
        if not p2p_ops:
            return
        works = dist.batch_isend_irecv(p2p_ops)
        if len(works) != len(p2p_ops):  # a backend that coalesces the group into one work: wait for all
            for w in works:
                w.wait()
            return
        for w, (is_send, tensor) in zip(works, kinds):
            if is_send:
                self._pending.append((w, tensor))
            else:
                w.wait()
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def finish(self) -> None:
        """Wait for every send still in flight (call at the end of the schedule)."""
        for w, _ in self._pending:
            w.wait()
        self._pending.clear()

    # -- readable wrappers (Megatron's names) ----------------------------------------------------
    def recv_forward(self) -> torch.Tensor:
        return self.communicate(recv_prev=True)[0]

    def send_forward(self, t: Optional[torch.Tensor]) -> None:
        self.communicate(send_next=t)

    def recv_backward(self) -> torch.Tensor:
        return self.communicate(recv_next=True)[1]

    def send_backward(self, t: Optional[torch.Tensor]) -> None:
        self.communicate(send_prev=t)
