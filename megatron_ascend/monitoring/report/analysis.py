"""The numbers of the run / comparison reports, computed from TensorBoard scalars, run metadata and rank
statistics (pure functions; figures.py draws them, build.py assembles the page).

Definitions (docs/REPRODUCING.md explains how to read them):

* smoothed loss: the trailing mean of ``lm loss`` over ``window`` iterations (fewer at the start);
* seed-noise band at step k: the largest |smoothed(seed B) - smoothed(seed A)| within ``window`` steps of k, for
  two runs of one recipe at two seeds on one machine; a run is *inside the band* at k when
  |smoothed(run) - smoothed(baseline)| <= band(k); it *agrees after* step k0 when it is inside at every step from
  k0 on;
* time to target: the first iteration whose smoothed loss is <= the target; its tokens (iterations x tokens per
  step) and seconds (the sum of per-step times up to it: each step's slowest rank from rank_stats.jsonl, else the
  logged ``iteration-time``), and device-seconds (seconds x devices);
* throughput: medians of the logged ``throughput`` (TFLOP/s per device) and ``tokens-per-sec``; MFU = median
  TFLOP/s per device / peak (the peak: an override, else the run's own from its metadata, else the device
  table's);
* stragglers: a rank whose straggler-probe TFLOP/s (rank_stats.jsonl) is below ``STRAGGLER_FRACTION`` of the
  ranks' median; slow steps: steps over ``SLOW_STEP_FACTOR`` x the median step time.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .runs import Run, Series

LOSS = "lm loss"
STRAGGLER_FRACTION = 0.9
SLOW_STEP_FACTOR = 1.5
MOE_PREFIX = "moe/tokens_per_expert_imbalance_layer_"


def trailing_mean(values: Sequence[float], window: int) -> List[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def common(a: Series, b: Series) -> Tuple[List[int], List[float], List[float]]:
    db = b.as_dict()
    steps = [s for s in a.steps if s in db]
    da = a.as_dict()
    return steps, [da[s] for s in steps], [db[s] for s in steps]


def default_window(n_steps: int) -> int:
    return max(1, min(10, n_steps // 20 or 1))


def smoothed(series: Series, window: int) -> Series:
    vals = [v if math.isfinite(v) else float("nan") for v in series.values]
    return Series(list(series.steps), trailing_mean(vals, window), list(series.walls))


def noise_band(s1: Series, s2: Series, window: int) -> Optional[Dict[str, list]]:
    """The seed-noise band on the steps both seeds logged (see the module doc)."""
    a, b = smoothed(s1, window), smoothed(s2, window)
    steps, va, vb = common(a, b)
    if not steps:
        return None
    d = [abs(y - x) for x, y in zip(va, vb)]
    band = [max(d[max(0, k - window): k + window + 1]) for k in range(len(d))]
    return {"steps": steps, "band": band, "abs_diff": d}


def compare_curves(base: Series, other: Series, window: int, band: Optional[Dict[str, list]] = None
                   ) -> Optional[Dict[str, object]]:
    """Smoothed and raw differences (other - base) on the common steps, and, with a band, where they lie."""
    steps, raw_a, raw_b = common(base, other)
    if not steps:
        return None
    sa, sb = smoothed(base, window).as_dict(), smoothed(other, window).as_dict()
    diff = [sb[s] - sa[s] for s in steps]
    raw = [y - x for x, y in zip(raw_a, raw_b)]
    fin = [abs(x) for x in diff if math.isfinite(x)]
    fin_raw = [abs(x) for x in raw if math.isfinite(x)]
    out: Dict[str, object] = {
        "steps": steps, "diff": diff, "raw_diff": raw, "count": len(steps),
        "max_abs": max(fin) if fin else float("nan"), "mean_abs": sum(fin) / len(fin) if fin else float("nan"),
        "max_abs_raw": max(fin_raw) if fin_raw else float("nan"),
        "mean_abs_raw": sum(fin_raw) / len(fin_raw) if fin_raw else float("nan"),
        "final": diff[-1],
    }
    if band:
        bd = dict(zip(band["steps"], band["band"]))
        steps_b = [s for s in steps if s in bd]
        dd = dict(zip(steps, diff))
        inside = [abs(dd[s]) <= bd[s] for s in steps_b]
        agree_after = None
        for i in range(len(inside) - 1, -1, -1):
            if not inside[i]:
                break
            agree_after = steps_b[i]
        ratio = [abs(dd[s]) / bd[s] for s in steps_b if bd[s] > 0]
        out.update(band_steps=steps_b, band=[bd[s] for s in steps_b], inside=inside,
                   fraction_inside=sum(inside) / len(inside) if inside else float("nan"),
                   agree_after=agree_after, max_ratio_to_band=max(ratio) if ratio else float("nan"),
                   mean_band=sum(bd[s] for s in steps_b) / len(steps_b) if steps_b else float("nan"),
                   outside_steps=[s for s, ok in zip(steps_b, inside) if not ok][:50])
    return out


def step_seconds(run: Run) -> Dict[int, float]:
    """iteration -> seconds: the slowest rank's step time (rank_stats.jsonl), else the logged iteration-time
    spread over the iterations of its log interval."""
    out: Dict[int, float] = {}
    for line in run.rank_stats:
        for it, s in zip(line.get("iterations", []), line.get("step_seconds_max", [])):
            out[int(it)] = float(s)
    if out:
        return out
    it_time = run.series("iteration-time")
    prev = 0
    for step, v in zip(it_time.steps, it_time.values):
        for k in range(prev + 1, step + 1):
            out[k] = float(v)
        prev = step
    return out


def step_time_source(run: Run) -> str:
    return "rank_stats.jsonl (slowest rank per step)" if run.rank_stats else "TensorBoard iteration-time " \
                                                                              "(mean per log interval)"


def tokens_per_step(run: Run) -> Optional[float]:
    v = run.meta_get("throughput", "tokens_per_step")
    return float(v) if v else None


def devices(run: Run) -> Optional[int]:
    v = run.meta_get("hardware", "device_count")
    return int(v) if v else None


def device_name(run: Run) -> str:
    return str(run.meta_get("hardware", "device_name", default="unknown"))


def time_to_target(run: Run, target: float, window: int) -> Dict[str, object]:
    loss = smoothed(run.series(LOSS), window)
    out: Dict[str, object] = {"target": target, "reached": False, "window": window}
    hit = next((i for i, v in enumerate(loss.values) if math.isfinite(v) and v <= target), None)
    if hit is None:
        out["best_smoothed_loss"] = min((v for v in loss.values if math.isfinite(v)), default=None)
        return out
    step = loss.steps[hit]
    out.update(reached=True, step=step, smoothed_loss=loss.values[hit])
    tps = tokens_per_step(run)
    out["tokens"] = step * tps if tps else None
    secs = step_seconds(run)
    missing = [k for k in range(1, step + 1) if k not in secs]
    out["seconds"] = None if missing else sum(secs[k] for k in range(1, step + 1))
    if loss.walls and secs.get(loss.steps[0]) is not None:
        out["wall_seconds"] = loss.walls[hit] - loss.walls[0] + secs[loss.steps[0]]
    n = devices(run)
    out["devices"] = n
    out["device_seconds"] = out["seconds"] * n if (out["seconds"] is not None and n) else None
    return out


def _median(vals: Sequence[float]) -> Optional[float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def resolve_peak(run: Run, overrides: Dict[str, float]) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s per device, where it came from): --peak-tflops LABEL=X / X, else the run's metadata,
    else the device table (platform/devices.py) for the run's device name."""
    if run.label in overrides:
        return overrides[run.label], "--peak-tflops " + run.label
    if "*" in overrides:
        return overrides["*"], "--peak-tflops"
    v = run.meta_get("throughput", "peak_tflops_per_device")
    if v:
        return float(v), str(run.meta_get("throughput", "peak_source", default="run metadata"))
    from ...platform import peak_tflops
    name = run.meta_get("hardware", "device_name")
    p = peak_tflops(name) if name else None
    return (p, f"device table ({name})") if p else (None, "unknown (pass --peak-tflops)")


def shared_peaks(runs: Sequence[Run], overrides: Dict[str, float]) -> Dict[str, Tuple[Optional[float], str]]:
    """label -> (peak, source), one peak per device name: runs on the same device get the first such run's
    peak (a CPU peak is a GEMM ceiling measured at each start, which moves with the machine's load; one peak
    keeps their MFU ratio equal to their TFLOP/s ratio). An override for a label wins."""
    first: Dict[str, Tuple[Optional[float], str, str]] = {}
    out: Dict[str, Tuple[Optional[float], str]] = {}
    for r in runs:
        peak, src = resolve_peak(r, overrides)
        name = device_name(r)
        if r.label in overrides or "*" in overrides or name not in first:
            first.setdefault(name, (peak, src, r.label))
            out[r.label] = (peak, src)
        else:
            p0, s0, lab0 = first[name]
            out[r.label] = (p0, f"{s0}, as {lab0} (same device)")
    return out


def throughput_stats(run: Run, overrides: Optional[Dict[str, float]] = None,
                     peak: Optional[Tuple[Optional[float], str]] = None) -> Dict[str, object]:
    tf = run.series("throughput").values
    tok = run.series("tokens-per-sec").values
    mfu_logged = run.series("mfu").values
    n = devices(run)
    peak, src = peak if peak is not None else resolve_peak(run, overrides or {})
    med_tf = _median(tf)
    med_tok = _median(tok)
    return {"tflops_per_device_median": med_tf, "tokens_per_sec_median": med_tok,
            "tokens_per_sec_per_device_median": (med_tok / n) if (med_tok is not None and n) else None,
            "mfu_logged_median": _median(mfu_logged), "peak_tflops": peak, "peak_source": src,
            "mfu": (med_tf / peak) if (med_tf is not None and peak) else None, "devices": n,
            "flops_per_token": run.meta_get("throughput", "flops_per_token")}


def _quantile(sorted_vals: List[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(math.ceil(q * len(sorted_vals))) - 1))
    return sorted_vals[i]


def step_time_stats(run: Run) -> Dict[str, object]:
    secs = step_seconds(run)
    if not secs:
        return {"count": 0, "source": step_time_source(run)}
    v = sorted(secs.values())
    med = statistics.median(v)
    slow = sorted((k for k, s in secs.items() if s > SLOW_STEP_FACTOR * med))
    return {"count": len(v), "source": step_time_source(run), "median": med, "mean": sum(v) / len(v),
            "p90": _quantile(v, 0.9), "p99": _quantile(v, 0.99), "max": v[-1], "min": v[0],
            "slow_steps": slow[:30], "slow_step_count": len(slow), "slow_factor": SLOW_STEP_FACTOR}


def straggler_stats(run: Run) -> Dict[str, object]:
    lines = run.rank_stats
    if not lines:
        return {"available": False}
    world = len(lines[-1].get("rank_step_seconds_mean", []))
    probes: List[List[float]] = [[] for _ in range(world)]
    means: List[List[float]] = [[] for _ in range(world)]
    spread = []
    for ln in lines:
        for r, p in enumerate(ln.get("rank_probe_tflops", [])[:world]):
            if p is not None:
                probes[r].append(float(p))
        for r, m in enumerate(ln.get("rank_step_seconds_mean", [])[:world]):
            means[r].append(float(m))
        for hi, lo in zip(ln.get("step_seconds_max", []), ln.get("step_seconds_min", [])):
            if lo > 0:
                spread.append(hi / lo)
    probe_med = [_median(p) for p in probes]
    step_mean = [sum(m) / len(m) if m else None for m in means]
    overall = _median([p for p in probe_med if p is not None])
    flagged = [r for r, p in enumerate(probe_med) if p is not None and overall and p < STRAGGLER_FRACTION * overall]
    return {"available": True, "world": world, "rank_probe_tflops_median": probe_med,
            "rank_step_seconds_mean": step_mean, "probe_median": overall, "stragglers": flagged,
            "fraction": STRAGGLER_FRACTION, "rank_spread_median": _median(spread),
            "rank_spread_max": max(spread) if spread else None}


def memory_stats(run: Run) -> Dict[str, object]:
    cap = run.meta_get("hardware", "device_memory_bytes")
    kind = run.meta_get("hardware", "memory_kind", default="device")
    if run.rank_stats:
        world = len(run.rank_stats[-1].get("rank_mem_max_allocated_bytes", []))
        peak = [0] * world
        for ln in run.rank_stats:
            for r, b in enumerate(ln.get("rank_mem_max_allocated_bytes", [])[:world]):
                peak[r] = max(peak[r], int(b))
        src = "rank_stats.jsonl (every rank)"
    else:
        s = run.series("mem-max-allocated-bytes")
        peak = [int(max(s.values))] if s else []
        src = "TensorBoard mem-max-allocated-bytes (the logging rank only)"
    mx = max(peak) if peak else None
    return {"rank_peak_bytes": peak, "max_bytes": mx, "min_bytes": min(peak) if peak else None,
            "capacity_bytes": cap, "memory_kind": kind, "source": src,
            "max_fraction_of_capacity": (mx / cap) if (mx and cap) else None}


def moe_layers(run: Run) -> List[int]:
    return sorted(int(t[len(MOE_PREFIX):]) for t in run.scalars
                  if t.startswith(MOE_PREFIX) and " vs samples" not in t and t[len(MOE_PREFIX):].isdigit())


def moe_stats(run: Run) -> Dict[str, object]:
    layers = moe_layers(run)
    per = {}
    for layer in layers:
        s = run.series(f"{MOE_PREFIX}{layer}")
        if s:
            per[str(layer)] = {"first": s.values[0], "last": s.values[-1], "mean": sum(s.values) / len(s.values),
                               "max": max(s.values)}
    worst = run.series("moe/tokens_per_expert_imbalance_max")
    return {"layers": layers, "per_layer": per, "max_last": worst.values[-1] if worst else None,
            "max_over_run": max(worst.values) if worst else None}


def loss_summary(run: Run) -> Dict[str, object]:
    """The single-run table (tools/run_report.py's keys: quickstart.sh reads them)."""
    def first(tag):
        s = run.series(tag)
        return s.values[0] if s else None

    def last(tag):
        s = run.series(tag)
        return s.values[-1] if s else None

    tp = throughput_stats(run)
    mem = memory_stats(run)
    loss = run.series(LOSS)
    return {"iterations": loss.steps[-1] if loss else None, "lm loss first": first(LOSS),
            "lm loss last": last(LOSS), "lm loss validation first": first("lm loss validation"),
            "lm loss validation last": last("lm loss validation"),
            "throughput median (TFLOP/s/device)": tp["tflops_per_device_median"],
            "tokens/s median": tp["tokens_per_sec_median"],
            "MFU median (logged, own peak)": tp["mfu_logged_median"],
            "mem max allocated (bytes)": mem["max_bytes"],
            "moe imbalance last (max over layers)": last("moe/tokens_per_expert_imbalance_max")}


# -- comparability -------------------------------------------------------------------------------------------
CATEGORIES = ("recipe", "data", "model")
# configuration fields that describe how a run executes, not what it computes: they may differ between the runs
# a comparison is for (layout, precision, output, logging)
_EXECUTION_OPTIMIZER = {"bf16", "fp16", "initial_loss_scale", "min_loss_scale", "loss_scale_window",
                        "overlap_grad_reduce", "gradient_accumulation_fusion"}
_RECIPE_TRAINING = ("global_batch_size", "seq_length", "train_iters", "train_samples")
_RECIPE_ARGS = ("exit_at_loss", "exit_at_loss_window", "stage")
_DATA_FIELDS = ("split", "mock_data", "reset_position_ids", "reset_attention_mask", "eod_mask_loss")
_RECIPE_EXECUTION = {"layout", "precision"}  # $MEGATRON_ASCEND_RECIPE keys a comparison is about
_MODEL_IGNORED = {"vocab_size"}  # padded to the TP size: differs with the layout; the data checksum pins the ids


def fingerprint(run: Run) -> Dict[str, Dict[str, object]]:
    """What must be equal between compared runs, per category."""
    m = run.meta or {}
    cfg = m.get("config", {})
    rec = m.get("recipe") or {}
    recipe = {f"recipe.{k}": v for k, v in rec.items() if k not in _RECIPE_EXECUTION}
    recipe["stage"] = m.get("stage")
    recipe.update({f"training.{k}": cfg.get("training", {}).get(k) for k in _RECIPE_TRAINING})
    recipe.update({f"optimizer.{k}": v for k, v in cfg.get("optimizer", {}).items() if k not in _EXECUTION_OPTIMIZER})
    recipe.update({f"args.{k}": cfg.get("args", {}).get(k) for k in _RECIPE_ARGS})
    data = {"checksum": (m.get("data") or {}).get("checksum")}
    data.update({f"data.{k}": cfg.get("data", {}).get(k) for k in _DATA_FIELDS})
    model = {k: v for k, v in cfg.get("model", {}).items() if k not in _MODEL_IGNORED}
    return {"recipe": recipe, "data": data, "model": model}


def comparability(runs: Sequence[Run]) -> Dict[str, List[str]]:
    """category -> one line per difference from the first run ("metadata" when a run has none)."""
    out: Dict[str, List[str]] = {c: [] for c in CATEGORIES}
    missing = [r.label for r in runs if not r.meta]
    if missing:
        out["metadata"] = [f"{lab}: no run_metadata.json, so its recipe, data and model cannot be checked"
                           for lab in missing]
    with_meta = [r for r in runs if r.meta]
    if len(with_meta) < 2:
        return out
    base = with_meta[0]
    fb = fingerprint(base)
    for r in with_meta[1:]:
        fr = fingerprint(r)
        for cat in CATEGORIES:
            keys = sorted(set(fb[cat]) | set(fr[cat]))
            diffs = [k for k in keys if fb[cat].get(k) != fr[cat].get(k)]
            for k in diffs[:8]:
                out[cat].append(f"{r.label} vs {base.label}: {cat} {k} = {_short(fr[cat].get(k))} "
                                f"(vs {_short(fb[cat].get(k))})")
            if len(diffs) > 8:
                out[cat].append(f"{r.label} vs {base.label}: {len(diffs) - 8} more {cat} differences")
    return out


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def execution_key(run: Run) -> tuple:
    """What a seed pair must share: recipe, data, model, layout, precision, device kind and count."""
    fp = fingerprint(run)
    lay = dict(run.meta_get("layout", default={}) or {})
    return (repr(fp), repr(sorted(lay.items())), run.meta_get("precision"), device_name(run), devices(run),
            tuple(run.meta_get("hosts", default=[]) or []))


def find_noise_pair(runs: Sequence[Run]) -> Optional[Tuple[str, str]]:
    """Two runs equal in everything but the seed (same machine), the first such pair in the order given."""
    for i, a in enumerate(runs):
        if not a.meta:
            continue
        for b in runs[i + 1:]:
            if b.meta and a.meta.get("seed") != b.meta.get("seed") and execution_key(a) == execution_key(b):
                return a.label, b.label
    return None


def describe(run: Run) -> Dict[str, object]:
    """One row of the runs table: what differs between compared runs."""
    lay = run.meta_get("layout", default={}) or {}
    layout = " ".join(f"{k}{lay[k]}" for k in ("tp", "pp", "vp", "ep", "dp") if k in lay)
    if lay.get("sequence_parallel"):
        layout += " sp"
    if lay.get("distributed_optimizer"):
        layout += " distopt"
    return {"label": run.label, "dir": run.dir, "seed": run.meta_get("seed"), "precision": run.meta_get("precision"),
            "device": device_name(run), "devices": devices(run), "nodes": run.meta_get("hardware", "nodes"),
            "layout": layout or None,
            "recipe": (run.meta_get("recipe") or {}).get("name") if run.meta else None,
            "git": (run.meta_get("library", "git_commit") or "")[:12] or None,
            "torch": run.meta_get("software", "torch"),
            "data_checksum": str(run.meta_get("data", "checksum") or "")[:16] or None}


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}e}"
        return f"{v:.{digits}g}"
    return str(v)


def verdict(baseline: Run, runs: Sequence[Run], diffs: Dict[str, dict], noise: Optional[Dict[str, object]],
            targets: Dict[str, dict], throughput: Dict[str, dict], stragglers: Dict[str, dict]) -> List[str]:
    """Plain-language sentences, one per finding."""
    out: List[str] = []
    if noise is None:
        out.append("No seed-noise band: no two runs share recipe, layout, precision and machine with different "
                   "seeds (run the recipe at two seeds on one machine, or name them with --noise A B); loss "
                   "differences are shown without a band.")
    else:
        out.append(f"Seed-noise band from {noise['runs'][0]} and {noise['runs'][1]} (same recipe and machine, seeds "
                   f"{noise['seeds'][0]} and {noise['seeds'][1]}): smoothed loss differs by "
                   f"{fmt_num(noise['mean_band'])} on average, at most {fmt_num(noise['max_band'])}.")
    tb = targets.get(baseline.label, {})
    for r in runs:
        if r.label == baseline.label:
            continue
        d = diffs.get(r.label)
        if noise is not None and r.label in noise["runs"]:
            continue
        if d is None:
            out.append(f"{r.label}: no iterations in common with {baseline.label}; the loss curves cannot be compared.")
            continue
        if "agree_after" in d:
            n_after = d["agree_after"]
            if n_after is not None and n_after == d["band_steps"][0]:
                out.append(f"{r.label}: the curves agree with {baseline.label} within the seed-noise band at every "
                           f"step (max |diff| {fmt_num(d['max_abs'])}, {fmt_num(d['max_ratio_to_band'])}x the band "
                           f"at worst).")
            elif n_after is not None:
                out.append(f"{r.label}: the curves agree with {baseline.label} within the seed-noise band after "
                           f"step {n_after} ({100 * d['fraction_inside']:.0f}% of steps inside; max |diff| "
                           f"{fmt_num(d['max_abs'])}).")
            else:
                out.append(f"{r.label}: the curves leave the seed-noise band and end outside it: smoothed "
                           f"difference {fmt_num(d['final'])} at the last step, {100 * d['fraction_inside']:.0f}% "
                           f"of steps inside, up to {fmt_num(d['max_ratio_to_band'])}x the band.")
        else:
            out.append(f"{r.label}: smoothed loss differs from {baseline.label} by {fmt_num(d['mean_abs'])} on "
                       f"average (max {fmt_num(d['max_abs'])}).")
        tr = targets.get(r.label, {})
        target = tr.get("target")
        if tr.get("reached") and tb.get("reached"):
            msg = (f"{r.label} reaches loss {fmt_num(target)} at step {tr['step']} vs {tb['step']} for "
                   f"{baseline.label}")
            if tr.get("device_seconds") and tb.get("device_seconds"):
                ratio = tb["device_seconds"] / tr["device_seconds"]
                msg += (f"; {fmt_num(ratio if ratio >= 1 else 1 / ratio)}x {'faster' if ratio >= 1 else 'slower'} "
                        f"per device "
                        f"({fmt_num(tr['device_seconds'])} vs {fmt_num(tb['device_seconds'])} device-seconds)")
            out.append(msg + ".")
        elif target is not None and (tr or tb):
            who = [lab for lab, t in ((r.label, tr), (baseline.label, tb)) if not t.get("reached")]
            out.append(f"loss {fmt_num(target)} is not reached by {' and '.join(who)}.")
        ta, tt = throughput.get(baseline.label, {}), throughput.get(r.label, {})
        if ta.get("tflops_per_device_median") and tt.get("tflops_per_device_median"):
            out.append(f"{r.label} runs {fmt_num(tt['tflops_per_device_median'])} TFLOP/s per device "
                       f"(MFU {_pct(tt.get('mfu'))}) vs {fmt_num(ta['tflops_per_device_median'])} "
                       f"(MFU {_pct(ta.get('mfu'))}) for {baseline.label}.")
    for lab, s in stragglers.items():
        if s.get("stragglers"):
            out.append(f"{lab}: straggler ranks {s['stragglers'][:16]} (probe GEMM below "
                       f"{int(100 * s['fraction'])}% of the median rank).")
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
