"""Run reports: one run (tools/run_report.py) or a comparison of runs (tools/compare_runs.py), one code path.

Module map:
  runs       load a run directory: TensorBoard scalars (with wall times), run_metadata.json, rank_stats.jsonl
  analysis   the numbers: seed-noise band, loss differences, time / tokens to a target loss, throughput and MFU,
             step times and stragglers, memory per rank, MoE balance, comparability, the plain-language verdict
  figures    the PNGs (matplotlib, imported when drawing)
  page       the HTML page (self-contained; a load-time script marks every figure loaded or failed)
  build      build(run_dirs, out_dir, mode="report"|"compare", ...): index.html + PNGs + summary.json

docs/REPRODUCING.md says how to read a report.
"""
from .build import ALLOW_CATEGORIES, build, parse_allow, parse_peaks
from .runs import ReportError, Run, Series, load_run, load_runs, load_scalars

__all__ = ["ALLOW_CATEGORIES", "build", "parse_allow", "parse_peaks", "ReportError", "Run", "Series", "load_run",
           "load_runs", "load_scalars"]
