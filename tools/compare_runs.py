#!/usr/bin/env python
"""Compare two or more training runs: one HTML report with PNG figures and a JSON summary.

    python tools/compare_runs.py RUN_A RUN_B [RUN_C ...] [--labels a b c] [--out compare/] [--target-loss 3.0]
        [--baseline a] [--noise a b] [--peak-tflops a=376 b=989] [--allow-different recipe,data,model]

Each RUN is the --tensorboard-dir of a run (TensorBoard scalars + run_metadata.json + rank_stats.jsonl, written
by every megatron_ascend training run). The report has: the loss curves overlaid and their difference to the
baseline (the first run, or --baseline) against a seed-noise band measured from two runs of the same recipe at
two seeds on one machine (found in the metadata, or named with --noise); time, tokens and device-seconds to a
target loss (--target-loss, default the recipe's); TFLOP/s and tokens/s per device and MFU (peak from the run
metadata / device table, or --peak-tflops); the step-time distribution, slow steps and straggler ranks; peak
memory per rank; MoE load balance per layer over time; the run metadata (hardware, software, kernels); and a
plain-language verdict. It refuses (exit 2, one line per difference) runs whose recipe, data or model differ,
or that have no metadata, unless --allow-different names the category; the report then says so at the top.
docs/REPRODUCING.md explains every number. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.monitoring.report import (ALLOW_CATEGORIES, ReportError, build, parse_allow,  # noqa: E402
                                                parse_peaks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/compare_runs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="two or more run directories (each run's --tensorboard-dir)")
    p.add_argument("--labels", nargs="*", default=None, help="one name per run (default: directory names)")
    p.add_argument("--out", default="compare_report", help="output directory (index.html, PNGs, summary.json)")
    p.add_argument("--baseline", default=None, help="label of the run the others are compared to (default: first)")
    p.add_argument("--noise", nargs=2, default=None, metavar=("SEED_A", "SEED_B"),
                   help="labels of the two seed runs that define the noise band (default: found in the metadata)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="loss for time/tokens-to-target (default: the recipe's target_loss, or --exit-at-loss)")
    p.add_argument("--window", type=int, default=None,
                   help="iterations the loss is smoothed over (default 10, fewer for short runs)")
    p.add_argument("--peak-tflops", nargs="*", default=None,
                   help="MFU peak per device: X for every run or LABEL=X (default: each run's metadata, else the "
                        "device table of platform/devices.py)")
    p.add_argument("--allow-different", nargs="*", default=None,
                   help=f"compare although these differ: {', '.join(ALLOW_CATEGORIES)} or all (comma or space "
                        f"separated)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: tools/compare_runs.py needs matplotlib; pip install matplotlib (or pip install -e .[tools])",
              file=sys.stderr)
        return 2
    try:
        summary = build(args.runs, args.out, args.labels, mode="compare", baseline=args.baseline, noise=args.noise,
                        target_loss=args.target_loss, window=args.window,
                        peak_overrides=parse_peaks(args.peak_tflops),
                        allow_different=parse_allow(args.allow_different))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {os.path.join(args.out, 'index.html')}  summary: {os.path.join(args.out, 'summary.json')}")
    if summary["allowed_differences"]:
        print(f"note: compared although their {', '.join(summary['allowed_differences'])} differ "
              f"(--allow-different)")
    for line in summary["verdict"]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
