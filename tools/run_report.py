#!/usr/bin/env python
"""HTML report with PNG figures and a JSON summary from one run (or a few), read from TensorBoard directories.

    python tools/run_report.py RUN_DIR [RUN_DIR ...] [--labels a b] [--out report/] [--target-loss 3.0]

Reads each run's event files (every scalar, no down-sampling) and, when the run wrote them, its
run_metadata.json and rank_stats.jsonl (monitoring/run_metadata.py), and writes ``OUT/index.html``, one PNG per
figure -- loss (with the validation points), throughput and MFU, tokens/s, step times and the per-rank
straggler probe, memory per rank, MoE load balance per layer over time, the MTP / balance losses, learning rate,
gradient norm -- and ``OUT/summary.json`` with the numbers. With two runs it adds the per-step ``lm loss``
difference (run 2 minus run 1). tools/compare_runs.py is the same report for comparing runs (seed-noise band,
time to a target loss, a verdict, and a refusal when recipe, data or model differ); both share
megatron_ascend/monitoring/report. Needs matplotlib (``pip install -e .[tools]``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ascend.monitoring.report import ReportError, build, parse_peaks  # noqa: E402
from megatron_ascend.monitoring.report import runs as _runs  # noqa: E402


def load_scalars(run_dir: str):
    """tag -> (steps, values) of a TensorBoard directory (SystemExit with the reason when unreadable)."""
    try:
        return {t: (s.steps, s.values) for t, s in _runs.load_scalars(run_dir).items()}
    except ReportError as e:
        raise SystemExit(f"error: {e}")


def build_report(run_dirs, out_dir, labels=None, **kw):
    """Write OUT/index.html, the PNGs and summary.json; return the summary dict."""
    try:
        return build(run_dirs, out_dir, labels, mode="report", **kw)
    except ReportError as e:
        raise SystemExit(f"error: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/run_report.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="TensorBoard log directories (--tensorboard-dir of each run)")
    p.add_argument("--labels", nargs="*", default=None, help="one name per run (default: directory names)")
    p.add_argument("--out", default="run_report", help="output directory for index.html, the PNGs, summary.json")
    p.add_argument("--target-loss", type=float, default=None,
                   help="report when the smoothed lm loss first reaches this (default: the recipe's)")
    p.add_argument("--window", type=int, default=None, help="iterations the loss is smoothed over (default 10 or "
                                                            "fewer for short runs)")
    p.add_argument("--peak-tflops", nargs="*", default=None,
                   help="MFU peak per device: X for every run or LABEL=X (default: the run's metadata, else the "
                        "device table)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: tools/run_report.py needs matplotlib; pip install matplotlib (or pip install -e .[tools])",
              file=sys.stderr)
        return 2
    try:
        summary = build(args.runs, args.out, args.labels, mode="report", target_loss=args.target_loss,
                        window=args.window, peak_overrides=parse_peaks(args.peak_tflops))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {os.path.join(args.out, 'index.html')}")
    if "loss_difference" in summary:
        d = summary["loss_difference"]
        print(f"lm loss difference over {d['steps']} steps: max {d['max_abs']:.6g} mean {d['mean_abs']:.6g}")
    for line in summary.get("verdict", []):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
