"""Peak memory of the grouped-expert fallback (the path taken where torch._grouped_mm / the NPU grouped GEMM cannot
run), balanced routing vs every token on one expert, before and after issue 17.

before: the padded bmm this repository used until issue 17 (kept here, private to the benchmark): every expert's
        rows copied into a [E_local, max(counts), in] buffer, one bmm, gathered back -- with all tokens on one
        expert the buffers are E_local times the tokens, and so is the work;
after:  moe/experts.py's ``loop_grouped_linear`` -- one GEMM per non-empty expert into the output's rows: memory
        is the output and the input gradient whatever the routing.

Forward + backward of one grouped linear [T, h] x [E, I, h]. Peak = the most bytes of tensor storage alive at
once above what existed before the call (on CPU counted by a dispatch mode that follows every storage an op
creates until it is freed; on CUDA / NPU the caching allocator's max_allocated). Prints the numbers and the
before / after ratio; asserts nothing.

    python bench/grouped_fallback_memory.py [--tokens 4096 --hidden 1024 --inter 512 --experts 8]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ascend import platform  # noqa: E402
from megatron_ascend.moe.experts import loop_grouped_linear  # noqa: E402


def padded_bmm_before(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """The fallback before issue 17 (x [T, in], weight [G, out, in]): pad every expert to the largest count."""
    w = weight.transpose(1, 2)
    g = w.shape[0]
    cnt = torch.tensor(counts, dtype=torch.long, device=x.device)
    cap = max(counts) if counts else 0
    group = torch.repeat_interleave(torch.arange(g, device=x.device), cnt)
    pos = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(cnt, 0) - cnt)[group]
    buf = x.new_zeros(g, cap, x.shape[1]).index_put((group, pos), x)
    return torch.bmm(buf, w)[group, pos]


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive; ``peak`` is the largest total seen."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref = StorageWeakRef
        self.live = {}  # data_ptr -> (weakref, nbytes)
        self.peak = 0

    def _sweep(self):
        for k in [k for k, (r, _) in self.live.items() if r.expired()]:
            del self.live[k]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if st.data_ptr() and st.data_ptr() not in self.live:
                    self.live[st.data_ptr()] = (self._ref(st), st.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(fn, x, w, counts, device) -> int:
    xi = x.detach().clone().requires_grad_()
    wi = w.detach().clone().requires_grad_()
    if device.type == "cpu":
        with LiveStorage() as m:
            fn(xi, wi, counts).sum().backward()
        return m.peak
    platform.synchronize()
    platform.reset_peak_memory_stats()
    base = platform.memory_stats()["allocated"]
    fn(xi, wi, counts).sum().backward()
    platform.synchronize()
    return platform.memory_stats()["max_allocated"] - base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8, help="experts on this rank (E_local)")
    ap.add_argument("--device", default=None, help="cpu | cuda | npu (default: the platform's)")
    a = ap.parse_args(argv)
    device = torch.device(a.device) if a.device else platform.get_platform().device()
    torch.manual_seed(0)
    t, e = a.tokens, a.experts
    x = torch.randn(t, a.hidden, device=device)
    w = torch.randn(e, a.inter, a.hidden, device=device) * a.hidden ** -0.5
    mib = 2.0 ** 20
    print(f"# grouped linear fwd+bwd T={t} h={a.hidden} I={a.inter} E_local={e} fp32 on {device}: peak MiB above "
          f"the inputs (output alone {t * a.inter * 4 / mib:.0f} MiB)")
    rows = {}
    for routing, counts in [("balanced", [t // e] * (e - 1) + [t - t // e * (e - 1)]),
                            ("all tokens on one expert", [t] + [0] * (e - 1))]:
        before = peak_bytes(padded_bmm_before, x, w, counts, device)
        after = peak_bytes(loop_grouped_linear, x, w, counts, device)
        rows[routing] = (before, after)
        print(f"{routing:<26} before (padded bmm) {before / mib:8.1f}   after (per-expert loop) {after / mib:8.1f}   "
              f"before/after {before / max(after, 1):5.2f}")
    (b0, a0), (b1, a1) = rows.values()
    print(f"# growth with imbalance (one expert / balanced): before {b1 / max(b0, 1):.2f}x, after {a1 / max(a0, 1):.2f}x")


if __name__ == "__main__":
    main()
