#!/usr/bin/env python
"""HTML report with PNG plots from one or more TensorBoard runs.

    python tools/run_report.py RUN_DIR [RUN_DIR ...] [--labels npu gpu] [--out report/]

Reads each run's event files with tensorboard's EventAccumulator (every scalar, no down-sampling) and writes
``OUT/index.html`` plus one PNG per panel: training and validation loss, throughput (TFLOP/s per device and
tokens/s), MFU, memory, MoE load balance (tokens-per-expert max/mean per layer) and the auxiliary losses.
With two runs (say NPU vs GPU, or two parallel layouts) it adds the per-step ``lm loss`` difference (run 2 minus
run 1 on the iterations both logged) with its maximum and mean absolute value. ``OUT/summary.json`` holds the
numbers of the tables. Needs matplotlib (``pip install -e .[tools]`` or ``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

Series = Tuple[List[int], List[float]]


def load_scalars(run_dir: str) -> Dict[str, Series]:
    """tag -> (steps, values) for every scalar of a TensorBoard run directory (latest value wins per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: run directory {run_dir!r} does not exist; pass a --tensorboard-dir of a run")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise SystemExit(f"error: no TensorBoard scalars under {run_dir!r}; is it the --tensorboard-dir of a run?")
    out: Dict[str, Series] = {}
    for tag in tags:
        per_step: Dict[int, float] = {}
        for ev in acc.Scalars(tag):
            per_step[int(ev.step)] = float(ev.value)
        steps = sorted(per_step)
        out[tag] = (steps, [per_step[s] for s in steps])
    return out


def loss_difference(a: Series, b: Series) -> Optional[Dict[str, object]]:
    """b - a on the steps both have: steps, diffs, max |diff|, mean |diff|."""
    da = dict(zip(*a))
    common = [s for s in b[0] if s in da]
    if not common:
        return None
    db = dict(zip(*b))
    diffs = [db[s] - da[s] for s in common]
    absd = [abs(d) for d in diffs if math.isfinite(d)]
    return {"steps": common, "diffs": diffs, "max_abs": max(absd) if absd else float("nan"),
            "mean_abs": sum(absd) / len(absd) if absd else float("nan"), "count": len(common)}


def _summary(scalars: Dict[str, Series]) -> Dict[str, Optional[float]]:
    def last(tag):
        s = scalars.get(tag)
        return s[1][-1] if s and s[1] else None

    def first(tag):
        s = scalars.get(tag)
        return s[1][0] if s and s[1] else None

    def median(tag):
        s = scalars.get(tag)
        if not s or not s[1]:
            return None
        v = sorted(s[1])
        return v[len(v) // 2]

    return {"iterations": (scalars.get("lm loss", ([None], []))[0] or [None])[-1],
            "lm loss first": first("lm loss"), "lm loss last": last("lm loss"),
            "lm loss validation first": first("lm loss validation"),
            "lm loss validation last": last("lm loss validation"),
            "throughput median (TFLOP/s/device)": median("throughput"),
            "tokens/s median": median("tokens-per-sec"), "MFU median": median("mfu"),
            "mem max allocated (bytes)": max(scalars["mem-max-allocated-bytes"][1])
            if scalars.get("mem-max-allocated-bytes") else None,
            "moe imbalance last (max over layers)": last("moe/tokens_per_expert_imbalance_max")}


def _plot(path: str, title: str, ylabel: str, curves: Sequence[Tuple[str, Series]], logy: bool = False) -> bool:
    curves = [(lab, s) for lab, s in curves if s and s[0]]
    if not curves:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in curves:
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def build_report(run_dirs: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write OUT/index.html, the PNGs and summary.json; return the summary dict."""
    labels = list(labels or [os.path.basename(os.path.normpath(d)) or d for d in run_dirs])
    if len(labels) != len(run_dirs):
        raise SystemExit(f"error: {len(labels)} --labels for {len(run_dirs)} runs; give one label per run")
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    runs = {lab: load_scalars(d) for lab, d in zip(labels, run_dirs)}
    os.makedirs(out_dir, exist_ok=True)
    panels = []

    def panel(name, title, ylabel, tags, logy=False):
        curves = []
        for lab, sc in runs.items():
            for tag in tags:
                if tag in sc:
                    curves.append((f"{lab}: {tag}" if len(tags) > 1 or len(runs) > 1 else tag, sc[tag]))
        if _plot(os.path.join(out_dir, name), title, ylabel, curves, logy):
            panels.append((title, name))

    panel("loss.png", "Loss", "loss", ["lm loss", "lm loss validation"])
    panel("aux_loss.png", "MTP and load-balancing losses", "loss", ["mtp_1 loss", "load_balancing_loss"])
    panel("throughput.png", "Throughput per device", "TFLOP/s/device", ["throughput"])
    panel("tokens.png", "Tokens per second (job)", "tokens/s", ["tokens-per-sec"])
    panel("mfu.png", "Model FLOPs utilisation", "MFU (fraction of peak)", ["mfu"])
    panel("memory.png", "Memory", "bytes", ["mem-allocated-bytes", "mem-max-allocated-bytes"])
    panel("lr.png", "Learning rate", "lr", ["learning-rate"])
    panel("grad_norm.png", "Gradient norm", "grad norm", ["grad-norm"])
    moe_tags = sorted({t for sc in runs.values() for t in sc
                       if t.startswith("moe/tokens_per_expert_imbalance_layer_") and " vs samples" not in t},
                      key=lambda t: int(t.rsplit("_", 1)[1]))
    panel("moe.png", "MoE load balance (max / mean tokens per expert)", "imbalance", moe_tags)
    summary: Dict[str, object] = {"runs": {lab: _summary(sc) for lab, sc in runs.items()},
                                  "run_dirs": dict(zip(labels, run_dirs))}
    if len(runs) == 2:
        (la, sa), (lb, sb) = runs.items()
        if "lm loss" in sa and "lm loss" in sb:
            diff = loss_difference(sa["lm loss"], sb["lm loss"])
            if diff is not None:
                summary["loss_difference"] = {"runs": [la, lb], "max_abs": diff["max_abs"],
                                              "mean_abs": diff["mean_abs"], "steps": diff["count"]}
                if _plot(os.path.join(out_dir, "loss_diff.png"), f"lm loss difference ({lb} - {la})",
                         "difference", [(f"{lb} - {la}", (diff["steps"], diff["diffs"]))]):
                    panels.append((f"lm loss difference ({lb} - {la})", "loss_diff.png"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(_html(summary, panels))
    return summary


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return html.escape(str(v))


def _html(summary, panels) -> str:
    runs = summary["runs"]
    keys = list(next(iter(runs.values())).keys())
    rows = "".join("<tr><th>" + html.escape(k) + "</th>" + "".join(f"<td>{_fmt(r[k])}</td>" for r in runs.values())
                   + "</tr>" for k in keys)
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(lab)}</th>" for lab in runs) + "</tr>"
    dirs = "".join(f"<li>{html.escape(lab)}: <code>{html.escape(d)}</code></li>"
                   for lab, d in summary["run_dirs"].items())
    diff = ""
    if "loss_difference" in summary:
        d = summary["loss_difference"]
        diff = (f"<h2>Loss difference</h2><p>{html.escape(d['runs'][1])} - {html.escape(d['runs'][0])} over "
                f"{d['steps']} common iterations: max |diff| = {_fmt(d['max_abs'])}, "
                f"mean |diff| = {_fmt(d['mean_abs'])}</p>")
    imgs = "".join(f"<h3>{html.escape(t)}</h3><img src='{html.escape(n)}' alt='{html.escape(t)}'>" for t, n in panels)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>megatron_ascend run report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>Run report</h1><ul>{dirs}</ul><table>{head}{rows}</table>{diff}{imgs}</body></html>")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/run_report.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="TensorBoard log directories (--tensorboard-dir of each run)")
    p.add_argument("--labels", nargs="*", default=None, help="one name per run (default: directory names)")
    p.add_argument("--out", default="run_report", help="output directory for index.html and the PNGs")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: tools/run_report.py needs matplotlib; pip install matplotlib (or pip install -e .[tools])",
              file=sys.stderr)
        return 2
    summary = build_report(args.runs, args.out, args.labels)
    print(f"report: {os.path.join(args.out, 'index.html')}")
    if "loss_difference" in summary:
        d = summary["loss_difference"]
        print(f"lm loss difference over {d['steps']} steps: max {d['max_abs']:.6g} mean {d['mean_abs']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
