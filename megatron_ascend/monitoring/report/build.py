"""Assemble a report: load the runs, check they may be compared, compute (analysis.py), draw (figures.py),
write ``OUT/index.html``, the PNGs and ``OUT/summary.json``.

``build(run_dirs, out_dir, ...)`` serves both tools: ``tools/run_report.py`` (mode "report": one run or a few,
no comparability check) and ``tools/compare_runs.py`` (mode "compare": refuses runs whose recipe, data or
model differ unless ``allow_different`` names the category).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

from . import analysis as A
from . import figures as F
from .page import Page, esc, table, transposed
from .runs import ReportError, Run, load_runs

ALLOW_CATEGORIES = ("recipe", "data", "model", "metadata")


def parse_allow(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                out += list(ALLOW_CATEGORIES)
            elif part in ALLOW_CATEGORIES:
                out.append(part)
            else:
                raise ReportError(f"--allow-different {part!r} is unknown; use {', '.join(ALLOW_CATEGORIES)} or all")
    return sorted(set(out))


def parse_peaks(values: Optional[Sequence[str]]) -> Dict[str, float]:
    """``--peak-tflops 989`` (every run) or ``--peak-tflops cpu=0.05 npu=376`` (per label)."""
    out: Dict[str, float] = {}
    for v in values or []:
        lab, _, num = str(v).rpartition("=")
        try:
            out[lab or "*"] = float(num)
        except ValueError:
            raise ReportError(f"--peak-tflops {v!r} is not a number or LABEL=number")
    return out


def refusal(comp: Dict[str, List[str]], allowed: Sequence[str]) -> Optional[str]:
    bad = [c for c, lines in comp.items() if lines and c not in allowed]
    if not bad:
        return None
    say = {"recipe": "their recipes differ", "data": "their data differ", "model": "their models differ",
           "metadata": "a run has no run_metadata.json"}
    lines = [f"refusing to compare: {'; '.join(say[c] for c in bad)}:"]
    for c in bad:
        lines += ["  " + x for x in comp[c]]
    lines.append(f"pass --allow-different {','.join(bad)} to compare them anyway (the report will say so)")
    return "\n".join(lines)


def _default_target(runs: Sequence[Run]) -> Optional[float]:
    for r in runs:
        v = (r.meta_get("recipe") or {}).get("target_loss") if r.meta else None
        if v is None:
            v = r.meta_get("config", "args", "exit_at_loss")
        if v is not None:
            try:
                return float(v)
            except (TypeError, ValueError):
                continue
    return None


def _mfu_series(run: Run, peak: Optional[float]):
    s = run.series("throughput")
    if not s or not peak:
        return [], []
    return list(s.steps), [v / peak for v in s.values]


def build(run_dirs: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None, *, mode: str = "report",
          baseline: Optional[str] = None, noise: Optional[Sequence[str]] = None,
          target_loss: Optional[float] = None, window: Optional[int] = None,
          peak_overrides: Optional[Dict[str, float]] = None, allow_different: Sequence[str] = (),
          title: Optional[str] = None) -> Dict[str, object]:
    if not run_dirs:
        raise ReportError("no runs given; pass one or more --tensorboard-dir directories")
    runs = load_runs(run_dirs, labels)
    by_label = {r.label: r for r in runs}
    comp = A.comparability(runs)
    if mode == "compare":
        if len(runs) < 2:
            raise ReportError("compare_runs needs two or more runs; tools/run_report.py reports one")
        msg = refusal(comp, allow_different)
        if msg:
            raise ReportError(msg)
    base = by_label.get(baseline) if baseline else runs[0]
    if base is None:
        raise ReportError(f"--baseline {baseline!r} is not one of the runs' labels {list(by_label)}")
    n_steps = max((len(r.series(A.LOSS).steps) for r in runs), default=0)
    window = int(window) if window else A.default_window(n_steps)
    if window < 1:
        raise ReportError(f"--window {window} must be >= 1")
    target = target_loss if target_loss is not None else _default_target(runs)
    peaks = peak_overrides or {}
    ci = {r.label: i for i, r in enumerate(runs)}
    os.makedirs(out_dir, exist_ok=True)

    # -- numbers -----------------------------------------------------------------------------------------
    noise_pair = None
    if noise:
        if len(noise) != 2 or any(n not in by_label for n in noise):
            raise ReportError(f"--noise takes two run labels out of {list(by_label)}; got {list(noise)}")
        noise_pair = (noise[0], noise[1])
    elif len(runs) > 2 or mode == "compare":
        noise_pair = A.find_noise_pair(runs)
    noise_info = None
    band = None
    if noise_pair:
        a, b = by_label[noise_pair[0]], by_label[noise_pair[1]]
        band = A.noise_band(a.series(A.LOSS), b.series(A.LOSS), window)
        if band:
            noise_info = {"runs": list(noise_pair), "seeds": [a.meta_get("seed"), b.meta_get("seed")],
                          "window": window, "mean_band": sum(band["band"]) / len(band["band"]),
                          "max_band": max(band["band"]), "final_band": band["band"][-1],
                          "steps": len(band["steps"])}
    diffs = {}
    for r in runs:
        if r is base:
            continue
        d = A.compare_curves(base.series(A.LOSS), r.series(A.LOSS), window, band)
        if d is not None:
            diffs[r.label] = d
    targets = {r.label: A.time_to_target(r, target, window) for r in runs} if target is not None else {}
    shared = A.shared_peaks(runs, peaks)
    thr = {r.label: A.throughput_stats(r, peaks, shared[r.label]) for r in runs}
    steps = {r.label: A.step_time_stats(r) for r in runs}
    strag = {r.label: A.straggler_stats(r) for r in runs}
    mem = {r.label: A.memory_stats(r) for r in runs}
    moe = {r.label: A.moe_stats(r) for r in runs}
    verdict = A.verdict(base, runs, diffs, noise_info, targets, thr, strag) if len(runs) > 1 else []
    allowed_used = [c for c, lines in comp.items() if lines]

    # -- figures -----------------------------------------------------------------------------------------
    figs: List[tuple] = []

    def fig(ok: bool, name: str, caption: str, section: str):
        if ok:
            figs.append((section, name, caption))

    path = lambda n: os.path.join(out_dir, n)  # noqa: E731
    loss_runs = []
    for r in runs:
        raw = r.series(A.LOSS)
        sm = A.smoothed(raw, window)
        val = r.series("lm loss validation")
        loss_runs.append({"label": r.label, "ci": ci[r.label], "raw": (raw.steps, raw.values),
                          "smooth": (sm.steps, sm.values), "valid": (val.steps, val.values)})
    fig(F.loss_curves(path("loss.png"), loss_runs, window), "loss.png",
        f"lm loss of every run; bold: trailing mean of {window} iterations, circles: validation", "loss")
    if diffs:
        band_fig = ({"steps": band["steps"], "band": band["band"], "label": " vs ".join(noise_pair)}
                    if band else None)
        fig(F.loss_difference(path("loss_diff.png"), base.label,
                              [{"label": lab, "ci": ci[lab], "steps": d["steps"], "diff": d["diff"],
                                "raw_diff": d["raw_diff"]} for lab, d in diffs.items()], band_fig,
                              zoom=[lab for lab in diffs if not noise_pair or lab not in noise_pair]),
            "loss_diff.png", f"smoothed lm loss minus {base.label}'s; grey: the seed-noise band" if band else
            f"smoothed lm loss minus {base.label}'s", "loss")
    cost_runs = []
    for r in runs:
        sm = A.smoothed(r.series(A.LOSS), window)
        tps = A.tokens_per_step(r)
        secs = A.step_seconds(r)
        n = A.devices(r) or 1
        cum, acc = [], 0.0
        for s in sm.steps:
            if s not in secs:
                break
            acc += secs[s]
            cum.append(acc * n)
        cost_runs.append({"label": r.label, "ci": ci[r.label], "loss": sm.values,
                          "tokens": [s * tps for s in sm.steps] if tps else [], "device_seconds": cum})
    fig(F.loss_vs_cost(path("loss_cost.png"), cost_runs, target), "loss_cost.png",
        "smoothed loss against tokens and against device-seconds" + (f"; dashed: target {target:g}" if target
                                                                      is not None else ""), "target")
    fig(F.throughput(path("throughput.png"),
                     [{"label": r.label, "ci": ci[r.label],
                       "tflops": (r.series("throughput").steps, r.series("throughput").values),
                       "mfu": _mfu_series(r, thr[r.label]["peak_tflops"]),
                       "peak": f"peak {A.fmt_num(thr[r.label]['peak_tflops'])}"} for r in runs]),
        "throughput.png", "model TFLOP/s per device and MFU at each log interval", "throughput")
    fig(F.lines(path("tokens.png"), "tokens per second (whole job)", "tokens/s",
                [(r.label, r.series("tokens-per-sec").steps, r.series("tokens-per-sec").values, ci[r.label])
                 for r in runs]), "tokens.png", "tokens/s of the job at each log interval", "throughput")
    st_runs = []
    for r in runs:
        secs = A.step_seconds(r)
        ks = sorted(secs)
        st_runs.append({"label": r.label, "ci": ci[r.label], "steps": ks, "seconds": [secs[k] for k in ks]})
    fig(F.step_times(path("step_time.png"), st_runs), "step_time.png",
        "per-step time (slowest rank) and its distribution", "steps")
    fig(F.stragglers(path("stragglers.png"),
                     [{"label": r.label, "ci": ci[r.label], "probe": strag[r.label].get("rank_probe_tflops_median")
                       or [], "step_mean": strag[r.label].get("rank_step_seconds_mean") or []} for r in runs]),
        "stragglers.png", "per-rank straggler probe (fixed GEMM) and mean step time", "steps")
    fig(F.memory(path("memory.png"), [{"label": r.label, "ci": ci[r.label], "peak": mem[r.label]["rank_peak_bytes"],
                                       "capacity": mem[r.label]["capacity_bytes"]
                                       if mem[r.label]["memory_kind"] != "host RAM" else None} for r in runs]),
        "memory.png", "peak memory per rank", "memory")
    for r in runs:
        layers = moe[r.label]["layers"]
        if not layers:
            continue
        all_steps = sorted({s for layer in layers for s in r.series(f"{A.MOE_PREFIX}{layer}").steps})
        matrix = []
        for layer in layers:
            d = r.series(f"{A.MOE_PREFIX}{layer}").as_dict()
            matrix.append([d.get(s) for s in all_steps])
        name = f"moe_{ci[r.label]}.png"
        fig(F.moe_heatmap(path(name), r.label, layers, all_steps, matrix), name,
            f"{r.label}: tokens-per-expert max/mean per MoE layer over iterations (1.0 = balanced)", "moe")
    fig(F.lines(path("aux_loss.png"), "MTP and load-balancing losses", "loss",
                [(f"{r.label}: {t}", r.series(t).steps, r.series(t).values, ci[r.label]) for r in runs
                 for t in ("mtp_1 loss", "load_balancing_loss") if r.series(t)]), "aux_loss.png",
        "MTP and load-balancing losses", "other")
    fig(F.lines(path("lr.png"), "learning rate", "lr",
                [(r.label, r.series("learning-rate").steps, r.series("learning-rate").values, ci[r.label])
                 for r in runs]), "lr.png", "learning rate", "other")
    fig(F.lines(path("grad_norm.png"), "gradient norm", "grad norm",
                [(r.label, r.series("grad-norm").steps, r.series("grad-norm").values, ci[r.label]) for r in runs]),
        "grad_norm.png", "gradient norm", "other")

    # -- summary.json ----------------------------------------------------------------------------------------
    def strip(d: Optional[dict]) -> Optional[dict]:
        if d is None:
            return None
        return {k: v for k, v in d.items() if not isinstance(v, list) or len(v) <= 64}

    run_rows = {}
    for r in runs:
        row = dict(A.loss_summary(r))
        row.update({"describe": A.describe(r), "throughput": thr[r.label], "step_time": steps[r.label],
                    "stragglers": strag[r.label], "memory": strip(mem[r.label]), "moe": moe[r.label],
                    "time_to_target": targets.get(r.label)})
        run_rows[r.label] = row
    summary: Dict[str, object] = {
        "mode": mode, "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "baseline": base.label, "window": window, "target_loss": target, "runs": run_rows,
        "run_dirs": {r.label: r.dir for r in runs}, "noise": noise_info,
        "differences": {lab: {k: v for k, v in d.items() if not isinstance(v, list) or k == "outside_steps"}
                        for lab, d in diffs.items()},
        "comparability": comp, "allowed_differences": allowed_used if mode == "compare" else [],
        "verdict": verdict, "figures": [{"file": n, "caption": c, "section": s} for s, n, c in figs],
    }
    if len(runs) == 2 and runs[1].label in diffs:
        d = diffs[runs[1].label]
        summary["loss_difference"] = {"runs": [runs[0].label, runs[1].label], "max_abs": d["max_abs_raw"],
                                      "mean_abs": d["mean_abs_raw"], "steps": d["count"]}
    with open(path("summary.json"), "w") as f:
        json.dump(_json_clean(summary), f, indent=2)
        f.write("\n")

    # -- page --------------------------------------------------------------------------------------------------
    page = Page(title or ("megatron_ascend run comparison" if mode == "compare" else "megatron_ascend run report"))
    page.p(f"generated {summary['generated']} by {' '.join(os.path.basename(a) for a in sys.argv[:1])}; "
           f"summary.json holds every number on this page.")
    if mode == "compare" and allowed_used:
        lines = [x for c in allowed_used for x in comp[c]]
        page.raw("<div class='warn'><b>These runs differ in " + esc(", ".join(allowed_used)) +
                 " (compared anyway, --allow-different):</b><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines)
                 + "</ul></div>")
    if verdict:
        page.h2("Verdict")
        page.bullets(verdict, "verdict")
    page.h2("Runs")
    desc = [A.describe(r) for r in runs]
    page.raw(table(["run", "recipe", "seed", "precision", "device", "devices", "nodes", "layout", "git", "torch",
                    "data checksum"],
                   [[d["label"], d["recipe"], d["seed"], d["precision"], d["device"], d["devices"], d["nodes"],
                     d["layout"], d["git"], d["torch"], d["data_checksum"]] for d in desc], left_cols=11))
    labels_ = [r.label for r in runs]
    page.raw(transposed(labels_, {lab: run_rows[lab] for lab in labels_},
                        ["iterations", "lm loss first", "lm loss last", "lm loss validation first",
                         "lm loss validation last", "throughput median (TFLOP/s/device)", "tokens/s median",
                         "MFU median (logged, own peak)", "mem max allocated (bytes)",
                         "moe imbalance last (max over layers)"]))
    sections = {"loss": "Loss curves", "target": "Time and tokens to the target loss",
                "throughput": "Throughput and MFU",
                "steps": "Step times and stragglers", "memory": "Memory per device", "moe": "MoE load balance",
                "other": "Other scalars"}
    for key, heading in sections.items():
        mine = [(n, c) for s, n, c in figs if s == key]
        extra = _section_text(key, runs, base, diffs, noise_info, targets, thr, steps, strag, mem, target, window)
        if not mine and not extra:
            continue
        page.h2(heading)
        for frag in extra:
            page.raw(frag)
        page.figures(mine)
    page.h2("Run metadata")
    for r in runs:
        if r.meta:
            sw = r.meta.get("software", {}) or {}
            hw = {k: v for k, v in (r.meta.get("hardware", {}) or {}).items() if k != "interconnect"}
            kern = r.meta.get("kernels", {}) or {}
            page.raw(f"<details><summary>{esc(r.label)}: {esc(r.dir)}</summary>"
                     + table(["software", "version"], sorted(sw.items()), 2)
                     + table(["hardware", "value"], sorted((k, str(v)) for k, v in hw.items()), 2)
                     + table(["kernel", "implementation"],
                             [(k, str(v.get("impl") if isinstance(v, dict) else v)) for k, v in sorted(kern.items())],
                             2) + "</details>")
        else:
            page.p(f"{r.label}: no run_metadata.json in {r.dir}")
    with open(path("index.html"), "w") as f:
        f.write(page.render())
    return summary


def _section_text(key, runs, base, diffs, noise, targets, thr, steps, strag, mem, target, window) -> List[str]:
    out = []
    if key == "loss" and diffs:
        rows = []
        for lab, d in diffs.items():
            rows.append([lab, d["count"], d["max_abs_raw"], d["max_abs"], d["mean_abs"], d["final"],
                         d.get("fraction_inside"), d.get("agree_after"), d.get("max_ratio_to_band")])
        out.append(table([f"run - {base.label}", "common steps", "max |diff| per step", "max |diff| smoothed",
                          "mean |diff| smoothed", "final smoothed diff", "fraction inside band", "inside from step",
                          "max |diff| / band"], rows))
        if noise:
            out.append(f"<p>Seed-noise band: {esc(noise['runs'][0])} vs {esc(noise['runs'][1])} (seeds "
                       f"{esc(noise['seeds'][0])}, {esc(noise['seeds'][1])}), smoothing window {window}: mean "
                       f"{A.fmt_num(noise['mean_band'])}, max {A.fmt_num(noise['max_band'])}.</p>")
    if key == "target":
        if target is None:
            out.append("<p>No target loss (pass --target-loss, or run a recipe that names one).</p>")
        else:
            rows = [[lab, t.get("reached"), t.get("step"), t.get("tokens"), t.get("seconds"), t.get("wall_seconds"),
                     t.get("devices"), t.get("device_seconds")] for lab, t in targets.items()]
            out.append(f"<p>Target: smoothed lm loss (mean of {window}) &le; {A.fmt_num(target)}.</p>")
            out.append(table(["run", "reached", "step", "tokens", "step seconds", "wall seconds", "devices",
                              "device-seconds"], rows))
    if key == "throughput":
        rows = [[lab, t["tflops_per_device_median"], t["tokens_per_sec_median"],
                 t["tokens_per_sec_per_device_median"], t["peak_tflops"], t["peak_source"], t["mfu"]]
                for lab, t in thr.items()]
        out.append(table(["run", "TFLOP/s per device", "tokens/s", "tokens/s per device", "peak TFLOP/s",
                          "peak from", "MFU"], rows, left_cols=1))
    if key == "steps":
        rows = [[lab, s.get("count"), s.get("median"), s.get("p90"), s.get("p99"), s.get("max"),
                 s.get("slow_step_count"), strag[lab].get("rank_spread_median"),
                 ", ".join(str(x) for x in strag[lab].get("stragglers", [])) or "none", s.get("source")]
                for lab, s in steps.items()]
        out.append(table(["run", "steps", "median s", "p90 s", "p99 s", "max s",
                          f"steps > {A.SLOW_STEP_FACTOR}x median", "rank spread (max/min)", "straggler ranks",
                          "source"], rows))
    if key == "memory":
        rows = [[lab, m["max_bytes"], m["min_bytes"], m["capacity_bytes"], m["memory_kind"],
                 m["max_fraction_of_capacity"], m["source"]] for lab, m in mem.items()]
        out.append(table(["run", "max bytes (a rank)", "min bytes (a rank)", "capacity bytes", "memory",
                          "max / capacity", "source"], rows))
    return out


def _json_clean(o):
    if isinstance(o, dict):
        return {str(k): _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
