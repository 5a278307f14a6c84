"""Fault-injection soak: kill -9 a random rank at random steps and during checkpoint saves, under
``torchrun --max-restarts``, and check that every trial ends with the parameters of an uninterrupted run
(bitwise, CPU) and that no corrupt or partial checkpoint was ever loaded.

    python bench/fault_injection.py [--trials 10] [--nproc 2] [--iters 8] [--seed 0]

Each trial runs ``torchrun --standalone --max-restarts 3 -m megatron_ascend.pretrain ... --load D --save D``
(D empty at the first start) with one of:

* ``step``: MEGATRON_ASCEND_FAULT kills a random rank at the start or inside the forward of a random iteration;
* ``save``: kills a random rank (rank 0 for the commit stages) while the checkpoint of a random save iteration
  is written (after the rank wrote its files / before the rename / before the tracker);
* ``external``: a watcher sends SIGKILL to a random worker process at a random time (0-1 s) after the first
  checkpoint of the first attempt was committed (a random step, possibly inside a save);
* ``hang``: a random rank stalls before a random iteration; the others wait in a collective until the
  watchdog (--watchdog-timeout-minutes 0.25) reports it and exits 4, and torchrun restarts the job.

After the job: exit code 0; the final checkpoint's every tensor (model, optimizer, RNG) equals the reference
run's; every checkpoint the log says was loaded ("loaded checkpoint ... at iteration I") still verifies
(sizes, SHA-256, metadata: it was complete and intact, not a partial save); the count of checkpoints the loader
skipped as corrupt is printed. One line per trial and a summary.

tests/test_auto_resume.py runs one short trial of this in CI (helpers imported from here).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --moe-router-score-function sigmoid "
        "--moe-router-topk-method noaux_tc --moe-router-bias-update-rate 0.01 --mtp-num-layers 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --mock-data --eval-iters 0 --log-interval 1 --lr 1e-3 --lr-warmup-iters 1 --seed 3 "
        "--expert-model-parallel-size 2 --use-distributed-optimizer")


def train_args(iters: int, save_interval: int, ckpt: str) -> List[str]:
    return TINY.split() + ["--train-iters", str(iters), "--save-interval", str(save_interval),
                           "--save", ckpt, "--load", ckpt]


def _env(fault: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ, MEGATRON_ASCEND_DEVICE="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MEGATRON_ASCEND_FAULT", None)
    if fault:
        env["MEGATRON_ASCEND_FAULT"] = fault
    return env


def _children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def launch(args: List[str], nproc: int = 2, max_restarts: int = 3, fault: Optional[str] = None,
           external_kill_after: Optional[float] = None, timeout: float = 900,
           kill_after_file: Optional[str] = None) -> Tuple[int, str, Optional[int]]:
    """torchrun the entry point; returns (exit code, log, pid killed externally or None). With
    ``external_kill_after`` a watcher SIGKILLs a random worker that many seconds after ``kill_after_file``
    appears (e.g. the checkpoint tracker: the job is past its start-up and first save) or after the start."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "-m", "megatron_ascend.pretrain", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(fault),
                            cwd=ROOT)
    killed = [None]

    def watcher():
        if kill_after_file is not None:
            while not os.path.exists(kill_after_file) and proc.poll() is None:
                time.sleep(0.05)
        time.sleep(external_kill_after)
        workers = _children(proc.pid)
        if workers and proc.poll() is None:
            victim = random.choice(workers)
            try:
                os.kill(victim, signal.SIGKILL)
                killed[0] = victim
            except ProcessLookupError:
                pass
    if external_kill_after is not None:
        threading.Thread(target=watcher, daemon=True).start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return 124, out, killed[0]
    return proc.returncode, out, killed[0]


def checkpoint_tensors(path: str):
    """{key: tensor} of every tensor stored in checkpoint directory ``path`` (model, optimizer, RNG)."""
    import torch
    from megatron_ascend.checkpointing.dcp_io import Chunk, read_chunks, read_metadata
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = read_metadata(path)
    out = {}
    chunks = []
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            t = torch.empty(tuple(v.size), dtype=v.properties.dtype)
            out[k] = t
            chunks.append(Chunk(k, tuple(v.size), (0,) * len(v.size), t))
    read_chunks(path, chunks, metadata=md)
    return out


def differing(a: Dict, b: Dict) -> List[str]:
    import torch
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k].view(-1).view(torch.uint8) if a[k].numel() else a[k],
                               b[k].view(-1).view(torch.uint8) if b[k].numel() else b[k])]


_LOADED = re.compile(r"loaded checkpoint from \S+ at iteration (\d+)")


def audit(log: str, ckpt_root: str) -> Dict[str, object]:
    """What the log says happened: attempts, the iterations loaded, skipped checkpoints, and whether every
    checkpoint loaded (and the final one) verifies (sizes + SHA-256 + metadata) after the job."""
    from megatron_ascend.checkpointing import CheckpointError, checkpoint_dir, find_checkpoint
    from megatron_ascend.checkpointing.selection import validate
    loads = [int(m.group(1)) for m in _LOADED.finditer(log)]
    bad = []
    for it in sorted(set(loads)):
        try:
            validate(checkpoint_dir(ckpt_root, it), "checksum")
        except CheckpointError:
            bad.append(it)
    path, it = find_checkpoint(ckpt_root, verify="checksum", fallback=False)
    return {"loads": loads, "suspicious_loads": bad, "skips": log.count("skipped checkpoint"),
            "attempts": log.count("training pretrain: iterations"), "final": path, "final_iter": it}


def run_trial(kind: str, rng: random.Random, work: str, iters: int, nproc: int, reference: Dict) -> Dict[str, object]:
    ck = os.path.join(work, "ck")
    shutil.rmtree(ck, ignore_errors=True)
    save_interval = 2
    fault, ext, desc = None, None, ""
    if kind == "step":
        it, rank, stage = rng.randint(2, iters), rng.randrange(nproc), rng.choice(["step", "forward"])
        fault, desc = f"kind=kill,iter={it},rank={rank},stage={stage}", f"kill -9 rank {rank} at iteration {it} ({stage})"
    elif kind == "save":
        it = rng.choice(list(range(save_interval, iters, save_interval)))
        stage = rng.choice(["after_write", "before_rename", "before_tracker"])
        rank = rng.randrange(nproc) if stage == "after_write" else 0
        fault, desc = f"kind=kill,iter={it},rank={rank},stage={stage}", f"kill -9 rank {rank} saving iteration {it} ({stage})"
    elif kind == "hang":
        it, rank = rng.randint(2, iters), rng.randrange(nproc)
        fault, desc = f"kind=hang,iter={it},rank={rank}", f"rank {rank} hangs before iteration {it} (watchdog)"
    else:
        ext = rng.uniform(0.0, 1.0)
        desc = f"external kill -9 of a random worker {ext:.1f} s after the first save"
    t = time.time()
    args = train_args(iters, save_interval, ck) + (["--watchdog-timeout-minutes", "0.25"] if kind == "hang" else [])
    rc, log, victim = launch(args, nproc, 3, fault, ext,
                             kill_after_file=os.path.join(ck, "latest_checkpointed_iteration.txt"))
    wall = time.time() - t
    res = {"kind": kind, "desc": desc, "rc": rc, "wall_s": wall, "victim": victim}
    if rc != 0:
        res.update(equal=False, error=log[-3000:])
        with open(os.path.join(os.path.dirname(work), f"failed_{kind}_{int(t)}.log"), "w") as f:
            f.write(f"{desc}\n{log}")
        return res
    a = audit(log, ck)
    diff = differing(reference, checkpoint_tensors(a["final"]))
    res.update(a, equal=not diff, diff=diff[:5])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="fault_inj_")
    try:
        ref_dir = os.path.join(work, "ref")
        t = time.time()
        rc, log, _ = launch(train_args(a.iters, 2, ref_dir), a.nproc, 0)
        if rc != 0:
            print(log[-3000:])
            return 1
        reference = checkpoint_tensors(os.path.join(ref_dir, f"iter_{a.iters:07d}"))
        print(f"reference: {a.iters} iterations on {a.nproc} ranks, {len(reference)} tensors, {time.time() - t:.1f} s")
        kinds = ["step", "save", "external", "hang"]
        results = []
        for i in range(a.trials):
            r = run_trial(kinds[i % len(kinds)], rng, work, a.iters, a.nproc, reference)
            results.append(r)
            print(f"trial {i + 1:2d}: {r['desc']:55s} rc {r['rc']} loads {r.get('loads')} skipped {r.get('skips')} "
                  f"suspicious {r.get('suspicious_loads')} final {r.get('final_iter')} equal {r['equal']} "
                  f"({r['wall_s']:.1f} s)" + ("" if r["equal"] else f" diff {r.get('diff')} {r.get('error', '')[-500:]}"),
                  flush=True)
        ok = sum(1 for r in results if r["equal"] and r["rc"] == 0 and not r.get("suspicious_loads"))
        resumes = sum(len([x for x in r.get("loads", [])]) for r in results)
        print(f"summary: {ok}/{len(results)} trials ended bitwise equal to the uninterrupted run; {resumes} resumes "
              f"from a checkpoint; {sum(1 for r in results if r.get('suspicious_loads'))} trials loaded a checkpoint that "
              f"does not verify; {sum(r.get('skips', 0) for r in results)} checkpoints skipped as corrupt")
        return 0 if ok == len(results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
