"""Hang detection (training/watchdog.py) through the trainer on 2 gloo ranks: rank 1 stalls before the step of
iteration 3 (training/faults.py ``kind=hang``), so rank 0 waits in that step's first collective, which rank 1
never joins. With --watchdog-timeout-minutes 0.05 (3 s; the process-group timeout stays 30 minutes) both
watchdogs fire: rank 0 reports the collective and group it waits in, the summary names rank 1 as the rank that
never joined (with where its main thread is), and both processes exit with code 4 (what torchrun
--max-restarts restarts). The lines are collected from files because the processes end in os._exit."""
import glob
import os
import time

import pytest

from tests.harness import DistributedTestError, run_distributed

TINY = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --q-lora-rank 16 "
        "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
        "--moe-ffn-hidden-size 16 --moe-router-topk 2 --first-k-dense-replace 1 --vocab-size 128 "
        "--make-vocab-size-divisible-by 1 --max-position-embeddings 64 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 2 --mock-data --eval-iters 0 --log-interval 1 --train-iters 5 "
        "--watchdog-timeout-minutes 0.05")


def _body(out_dir):
    import torch.distributed as dist
    from megatron_ascend.training.entry import parse
    from megatron_ascend.training.trainer import Trainer
    rank = dist.get_rank()
    os.environ["MEGATRON_ASCEND_FAULT"] = "kind=hang,iter=3,rank=1"
    tr = Trainer(parse(TINY.split(), "pretrain"), print_fn=lambda s: None)
    path = os.path.join(out_dir, f"wd_{rank}.txt")

    def log(line):
        with open(path, "a") as f:
            f.write(line + "\n")
    tr.watchdog.print_fn = log
    tr.watchdog.exit_fn = lambda code: (time.sleep(3), os._exit(code))  # the harness kills a world's survivors
    tr.train()
    return "finished"  # not reached: the watchdog ends the process


def test_collective_one_rank_never_joins_is_reported_naming_the_rank(tmp_path):
    with pytest.raises(DistributedTestError) as e:
        run_distributed(2, _body, str(tmp_path), timeout=240)
    assert "died with exit codes" in str(e.value) and "4" in str(e.value), str(e.value)
    lines = {int(os.path.basename(p)[3:-4]): open(p).read() for p in glob.glob(str(tmp_path / "wd_*.txt"))}
    r0, r1 = lines[0], lines[1]
    assert "WATCHDOG rank 0: iteration 3 has run" in r0 and "over the limit of 3.0 s" in r0, r0
    assert "waiting in all_reduce on group" in r0 and "ranks 0, 1" in r0, r0
    assert "never joined (not in any collective while the others wait): rank 1 at iteration 3, not in a " \
           "collective; main thread at faults.py" in r0, r0
    assert "WATCHDOG rank 1: iteration 3 has run" in r1 and "not in a collective" in r1, r1
    assert "never joined" not in r1  # one summary per job, from the lowest reporting rank
    assert "exiting with code 4" in r0 and "exiting with code 4" in r1
    elapsed = float(r0.split("has run ")[1].split(" s")[0])
    # fired once over the limit (the line rounds to 0.1 s: 3.04 s reads 3.0), long before the 30-minute PG timeout
    assert 3.0 <= elapsed < 3.0 + 60, elapsed
