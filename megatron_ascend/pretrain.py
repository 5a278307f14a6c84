"""`python -m megatron_ascend.pretrain`: pretraining entry point (run under torchrun).

Placeholder until the training loop lands: parses and validates the Megatron-style flags and prints the
parallel layout (--show-layout). The training engineer owns this module.
"""
from __future__ import annotations

import os
import sys

from .arguments import build_configs, exit_on_config_error, parse_args
from .parallel_state import RankLayout


@exit_on_config_error
def main(argv=None):
    args = parse_args(argv, prog="python -m megatron_ascend.pretrain",
                      description="Pretrain a DeepSeek-family MoE model with TP/SP/PP/EP/DP.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, par, opt, train, data = build_configs(args, world)
    if args.show_layout:
        print(RankLayout(par).format())
        return 0
    print("training loop not wired yet; use --show-layout", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
