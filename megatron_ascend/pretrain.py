"""`python -m megatron_ascend.pretrain`: pretraining entry point (run under torchrun; one process works too).

    torchrun --nproc_per_node 8 -m megatron_ascend.pretrain --num-layers 4 ... --train-iters 100
    python -m megatron_ascend.pretrain --help
    WORLD_SIZE=512 python -m megatron_ascend.pretrain <flags> --show-layout   # print the rank layout, exit

The loop lives in megatron_ascend/training/ (trainer.py); recipes in pretrain_scripts/; guide docs/USER_GUIDE.md.
"""
from __future__ import annotations

import sys

from .training.entry import cli


def main(argv=None) -> int:
    return cli(argv, "pretrain")


if __name__ == "__main__":
    sys.exit(main())
