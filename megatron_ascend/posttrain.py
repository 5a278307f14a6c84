"""`python -m megatron_ascend.posttrain`: full-parameter post-training (SFT) entry point (run under torchrun).

    torchrun --nproc_per_node 8 -m megatron_ascend.posttrain --load PRETRAINED --data-path SFT_PREFIX ... --stage sft

--stage dpo (preference tuning) is reserved and not implemented yet. Recipes in posttrain_scripts/.
"""
from __future__ import annotations

import sys

from .training.entry import cli


def main(argv=None) -> int:
    return cli(argv, "sft")


if __name__ == "__main__":
    sys.exit(main())
