"""Run a test body in N gloo processes on CPU and collect each rank's return value.

    results = run_distributed(4, body, arg1, timeout=180)

``body`` must be a module-level function (it is pickled to the workers). Workers are forked from a
forkserver that has imported torch once, so a world of 8 starts in about a second instead of 8 fresh
interpreters. Each worker runs with MEGATRON_ASCEND_DEVICE=cpu, a FileStore rendezvous (no port races under
pytest-xdist), the parent's CPU-kernel settings (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS: the forkserver
starts with the parent's environment) and ``OMP_NUM_THREADS`` intra-op threads when that is set, else one
(tests/run_cpu_matrix.py runs the suite under other kernels and thread counts; ``kernel_env()`` passes the same
settings to a test's own subprocesses). The first failing rank's traceback is raised in the parent (the others
are killed); a world that does not finish within ``timeout`` seconds is killed and
reported with the ranks that never answered, so a hang fails the test instead of the CI job.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
import time
import traceback

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "megatron_ascend.config",
                                     "megatron_ascend.parallel_state"])
    return _CTX


class DistributedTestError(AssertionError):
    pass


# what selects the CPU kernels and thread counts (and the code under test): every process the suite starts gets them
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "PYTHONPATH", "MA_TOLERANCE_LOG")


def kernel_env() -> dict:
    """The subset of os.environ in KERNEL_ENV, for a subprocess started with an otherwise minimal environment."""
    return {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}


def worker_threads() -> int:
    """Intra-op threads of a test worker: OMP_NUM_THREADS when set (so a run with OMP_NUM_THREADS=2 exercises
    two-thread kernels in the workers too), else 1 (eight ranks share a 2-core machine)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "") or 1))
    except ValueError:
        return 1


def _worker(rank, world_size, store_path, fn, args, kwargs, q, env):
    try:
        os.environ.update(env)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MEGATRON_ASCEND_DEVICE="cpu")
        import torch
        import torch.distributed as dist
        torch.set_num_threads(worker_threads())
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        try:
            out = fn(*args, **kwargs)
            q.put((rank, "ok", out))
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    except BaseException:
        q.put((rank, "err", traceback.format_exc()))


def run_distributed(world_size, fn, *args, timeout=300, env=None, **kwargs):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the list of per-rank results."""
    ctx = _context()
    tmp = tempfile.mkdtemp(prefix="ma_dist_")
    store = os.path.join(tmp, "store")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, store, fn, args, kwargs, q, dict(env or {})),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistributedTestError(f"{fn.__name__} timed out after {timeout}s at world size {world_size}; "
                                           f"ranks {missing} never finished (hang?)")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise DistributedTestError(f"{fn.__name__}: rank(s) {dead} died with exit codes "
                                               f"{[procs[r].exitcode for r in dead]} at world size {world_size}")
                continue
            if status == "err":
                raise DistributedTestError(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
    return [results[r] for r in range(world_size)]
