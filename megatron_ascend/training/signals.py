"""SIGTERM handling: the job scheduler's "please stop" becomes save-a-checkpoint-and-exit.

``ExitSignalHandler`` installs a handler that only records the signal; the training loop polls ``received()`` at
the end of each iteration, all ranks agree (an all-reduce of the flag, because a scheduler may signal ranks at
slightly different times), then the loop saves and exits. The previous handler is restored by ``release()``.
The flag travels as an int32 tensor on the platform's device: NCCL / HCCL reduce device tensors only (a host
tensor fails with "No backend type associated with device type cpu"; tests/test_fake_accelerator.py).
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

from .. import platform


class ExitSignalHandler:
    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = sig
        self._received = False
        self._previous = None
        self._installed = False

    def install(self) -> "ExitSignalHandler":
        try:
            self._previous = signal.signal(self.sig, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. an in-process test harness thread): poll-only
            self._installed = False
        return self

    def _handle(self, signum, frame):
        self._received = True

    def trigger(self) -> None:
        """Mark the signal as received (tests; the same path as a real SIGTERM)."""
        self._received = True

    def received(self, group: Optional[object] = None) -> bool:
        """True on every rank when any rank has received the signal (collective when distributed)."""
        flag = self._received
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=platform.get_platform().device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = bool(t.item() > 0)  # the one host read the decision needs
        return flag

    def release(self) -> None:
        if self._installed:
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
