"""The reports' PNG figures (matplotlib, Agg backend, imported only when a figure is drawn). Every function
writes one file and returns True, or returns False and writes nothing when it has no data to draw. A run keeps
its colour in every figure (``color(i)``)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

DPI = 90
SIZE = (7.5, 4.2)
WIDE = (11.0, 4.2)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def color(i: int) -> str:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return palette[i % len(palette)]


def _finish(fig, ax_list, path: str) -> bool:
    for ax in ax_list:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return True


def lines(path: str, title: str, ylabel: str, curves: Sequence[Tuple[str, Sequence, Sequence, int]],
          logy: bool = False, xlabel: str = "iteration") -> bool:
    """curves: (label, x, y, colour index)."""
    curves = [c for c in curves if len(c[1])]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    styles = ["-", "--", ":", "-."]
    seen: Dict[int, int] = {}
    for label, x, y, ci in curves:
        k = seen.get(ci, 0)
        seen[ci] = k + 1
        ax.plot(x, y, styles[k % len(styles)], color=color(ci), label=label,
                marker="o" if len(x) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    return _finish(fig, [ax], path)


def loss_curves(path: str, runs: Sequence[dict], window: int) -> bool:
    """runs: {label, ci, raw (steps, values), smooth (steps, values), valid (steps, values)}."""
    runs = [r for r in runs if r["raw"][0]]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    for r in runs:
        c = color(r["ci"])
        ax.plot(*r["raw"], color=c, alpha=0.25, linewidth=0.8)
        ax.plot(*r["smooth"], color=c, linewidth=1.6, label=f"{r['label']} (mean of {window})")
        if r["valid"][0]:
            ax.plot(*r["valid"], "o", color=c, markersize=4, markerfacecolor="white",
                    label=f"{r['label']} validation")
    ax.set_title("lm loss (faint: every iteration)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    return _finish(fig, [ax], path)


def loss_difference(path: str, baseline: str, diffs: Sequence[dict], band: Optional[dict],
                    zoom: Sequence[str] = ()) -> bool:
    """diffs: {label, ci, steps, diff, raw_diff}; band: {steps, band, label}. With ``zoom`` labels (the runs that
    are not the seed pair) a second panel shows just them, scaled to their own differences."""
    diffs = [d for d in diffs if d["steps"]]
    if not diffs:
        return False
    plt = _plt()
    zoomed = [d for d in diffs if d["label"] in zoom]
    if zoomed and len(zoomed) < len(diffs):
        fig, axes = plt.subplots(1, 2, figsize=WIDE)
    else:
        fig, ax0 = plt.subplots(figsize=SIZE)
        axes = [ax0]
    for k, ax in enumerate(axes):
        mine = diffs if k == 0 else zoomed
        if band:
            ax.fill_between(band["steps"], [-b for b in band["band"]], band["band"], color="#999999", alpha=0.3,
                            label=f"seed-noise band ({band['label']})")
        for d in mine:
            c = color(d["ci"])
            ax.plot(d["steps"], d["raw_diff"], color=c, alpha=0.2, linewidth=0.7)
            ax.plot(d["steps"], d["diff"], color=c, linewidth=1.5, label=f"{d['label']} - {baseline}")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("iteration")
        ax.set_ylabel("difference")
        if k == 1:
            vals = [abs(v) for d in mine for v in d["raw_diff"] + d["diff"] if math.isfinite(v)]
            lim = 1.3 * max(vals) if vals and max(vals) > 0 else 1.0
            ax.set_ylim(-lim, lim)
            ax.set_title("zoom: " + ", ".join(d["label"] for d in mine))
        else:
            ax.set_title(f"lm loss minus {baseline}'s (smoothed; faint: per iteration)")
    return _finish(fig, list(axes), path)


def loss_vs_cost(path: str, runs: Sequence[dict], target: Optional[float]) -> bool:
    """runs: {label, ci, tokens (x), device_seconds (x or None), loss (smoothed y)}: loss against tokens and
    against device-seconds."""
    runs = [r for r in runs if r["loss"]]
    if not runs:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=WIDE)
    for r in runs:
        c = color(r["ci"])
        if r["tokens"]:
            a1.plot(r["tokens"], r["loss"], color=c, label=r["label"])
        if r["device_seconds"]:
            a2.plot(r["device_seconds"], r["loss"][:len(r["device_seconds"])], color=c, label=r["label"])
    for ax, xl in ((a1, "tokens"), (a2, "device-seconds (step time x devices)")):
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:g}")
        ax.set_xlabel(xl)
        ax.set_ylabel("smoothed lm loss")
    a1.ticklabel_format(style="sci", axis="x", scilimits=(0, 3))
    a1.set_title("loss against tokens")
    a2.set_title("loss against device time")
    return _finish(fig, [a1, a2], path)


def throughput(path: str, runs: Sequence[dict]) -> bool:
    """runs: {label, ci, tflops (steps, values), mfu (steps, values)}."""
    runs = [r for r in runs if r["tflops"][0]]
    if not runs:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=WIDE)
    for r in runs:
        c = color(r["ci"])
        a1.plot(*r["tflops"], color=c, label=r["label"], marker="o", markersize=3)
        if r["mfu"][0]:
            a2.plot(r["mfu"][0], [100 * v for v in r["mfu"][1]], color=c, label=f"{r['label']} ({r['peak']})",
                    marker="o", markersize=3)
    a1.set_title("model TFLOP/s per device")
    a1.set_xlabel("iteration")
    a1.set_ylabel("TFLOP/s")
    a2.set_title("MFU (model FLOPs / peak)")
    a2.set_xlabel("iteration")
    a2.set_ylabel("% of peak")
    return _finish(fig, [a1, a2], path)


def step_times(path: str, runs: Sequence[dict]) -> bool:
    """runs: {label, ci, steps, seconds}: time series and distribution of step times."""
    runs = [r for r in runs if r["steps"]]
    if not runs:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=WIDE)
    for r in runs:
        c = color(r["ci"])
        a1.plot(r["steps"], r["seconds"], color=c, linewidth=0.8, label=r["label"])
    data = [r["seconds"] for r in runs]
    bp = a2.boxplot(data, whis=(1, 99), showfliers=True, patch_artist=True)
    for patch, r in zip(bp["boxes"], runs):
        patch.set_facecolor(color(r["ci"]))
        patch.set_alpha(0.5)
    a2.set_xticks(range(1, len(runs) + 1))
    a2.set_xticklabels([r["label"] for r in runs], rotation=15, fontsize=8)
    a1.set_title("step time (slowest rank)")
    a1.set_xlabel("iteration")
    a1.set_ylabel("seconds")
    a1.set_yscale("log")
    a2.set_title("step-time distribution (whiskers 1-99%)")
    a2.set_ylabel("seconds")
    a2.set_yscale("log")
    return _finish(fig, [a1, a2], path)


def _grouped_bars(ax, runs: Sequence[dict], key: str, scale: float = 1.0) -> None:
    from matplotlib.ticker import MaxNLocator
    n = len(runs)
    width = 0.8 / max(n, 1)
    ranks = 0
    for k, r in enumerate(runs):
        vals = [(v or 0.0) * scale for v in r[key]]
        ranks = max(ranks, len(vals))
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(vals))]
        ax.bar(xs, vals, width=width, color=color(r["ci"]), label=r["label"], alpha=0.8)
    if ranks <= 32:
        ax.set_xticks(range(ranks))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def stragglers(path: str, runs: Sequence[dict]) -> bool:
    """runs: {label, ci, probe (per rank), step_mean (per rank)}."""
    runs = [r for r in runs if r["probe"]]
    if not runs:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=WIDE)
    _grouped_bars(a1, runs, "probe")
    _grouped_bars(a2, runs, "step_mean", 1000.0)
    a1.set_title("straggler probe: GEMM TFLOP/s per rank")
    a1.set_xlabel("rank")
    a1.set_ylabel("TFLOP/s")
    a2.set_title("mean step time per rank")
    a2.set_xlabel("rank")
    a2.set_ylabel("ms")
    return _finish(fig, [a1, a2], path)


def memory(path: str, runs: Sequence[dict]) -> bool:
    """runs: {label, ci, peak (bytes per rank), capacity (bytes or None)}."""
    runs = [r for r in runs if r["peak"]]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    gib = 1.0 / 2 ** 30
    _grouped_bars(ax, runs, "peak", gib)
    caps = {r["capacity"] for r in runs if r["capacity"]}
    ymax = max(max(r["peak"]) for r in runs) * gib
    for cap in caps:
        if cap * gib < 4 * ymax:  # a host's RAM would flatten the bars: only draw capacities in range
            ax.axhline(cap * gib, color="black", linestyle="--", linewidth=0.8, label=f"capacity {cap * gib:.0f} GiB")
    ax.set_title("peak memory per rank (max allocated)")
    ax.set_xlabel("rank")
    ax.set_ylabel("GiB")
    return _finish(fig, [ax], path)


def moe_heatmap(path: str, label: str, layers: List[int], steps: List[int], matrix: List[List[float]]) -> bool:
    """matrix[layer][step]: tokens-per-expert max/mean; 1.0 is perfect balance."""
    if not layers or not steps:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=SIZE)
    vals = [v for row in matrix for v in row if v is not None and math.isfinite(v)]
    vmax = max(vals) if vals else 2.0
    im = ax.imshow([[v if v is not None else float("nan") for v in row] for row in matrix], aspect="auto",
                   origin="lower", cmap="viridis", vmin=1.0, vmax=max(vmax, 1.01),
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(x) for x in layers])
    ax.set_xlabel("iteration")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{label}: MoE load balance (max / mean tokens per expert)")
    fig.colorbar(im, ax=ax, label="imbalance")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True
