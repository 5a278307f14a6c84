#!/usr/bin/env python
"""The target table at the top of docs/BENCHMARKS.md, read from the outputs bench/run_all.sh collected.

    python bench/summary.py OUTPUT_DIR      (vs_transformers.md, mfu.md, comm_volume.md, scaling.md in it)

Prints a markdown table: each issue-11 target, the figure measured in this run, and whether it is met. A figure
that cannot be found in the outputs is printed as "not measured" (never guessed).
"""
import os
import re
import sys


def _read(d, name):
    p = os.path.join(d, name)
    return open(p).read() if os.path.exists(p) else ""


def rows(d):
    out = []
    vs = _read(d, "vs_transformers.md")
    for cfg, target in (("small", 1.5), ("large", 1.2)):
        m = re.search(r"== %s:.*?ratio ours / transformers = ([0-9.]+)x" % cfg, vs, re.S)
        steps = re.findall(r"== %s:.*?ours .*?median step\s+([0-9.]+) ms.*?transformers .*?median step\s+([0-9.]+) ms"
                           % cfg, vs, re.S)
        got = float(m.group(1)) if m else None
        detail = f"median step {steps[0][0]} vs {steps[0][1]} ms" if steps else ""
        out.append((f"vs transformers, {cfg}", f">= {target}x", None if got is None else f"{got:.2f}x",
                    None if got is None else got >= target, detail))
    mfu = _read(d, "mfu.md")
    for mb in (1, 4):
        m = re.search(r"1 process, .*?, %d micro-batch\(es\) per step: step ([0-9]+) ms.*?MFU\(gemm\) = ([0-9.]+)" % mb, mfu)
        got = float(m.group(2)) if m else None
        out.append((f"MFU vs in-process GEMM ceiling, 1 process, {mb} micro-batch(es) per step", ">= 0.6",
                    None if got is None else f"{got:.2f}", None if got is None else got >= 0.6,
                    f"step {m.group(1)} ms" if m else ""))
    for kind in ("TP2", "EP2"):
        m = re.search(r"2 ranks %s .*?MFU\(gemm\) = ([0-9.]+)" % kind, mfu)
        out.append((f"MFU at 2 ranks {kind}", "(printed)", m.group(1) if m else None, None, ""))
    cv = _read(d, "comm_volume.md")
    ratios = [float(x) for x in re.findall(r"ratio ([0-9.]+)", cv)]
    if ratios:
        ok = all(abs(r - 1.0) < 5e-5 for r in ratios)
        out.append(("comm volume measured / analytic", "1.00", f"{min(ratios):.4f}-{max(ratios):.4f} "
                    f"({len(ratios)} rows)", ok, ""))
    else:
        out.append(("comm volume measured / analytic", "1.00", None, None, ""))
    sc = _read(d, "scaling.md")
    acts = [float(x) for x in re.findall(r"measured/planner ([0-9.]+)", sc)]
    if acts:
        ok = all(abs(a - 1.0) <= 0.10 for a in acts)
        out.append(("activation bytes measured / planner", "within 10 %", f"{min(acts):.2f}-{max(acts):.2f}",
                    ok, f"{len(acts)} points"))
    return out


def main():
    d = sys.argv[1]
    print("| figure | target | measured | met | note |")
    print("|---|---|---|---|---|")
    for name, target, got, ok, note in rows(d):
        met = "-" if ok is None else ("yes" if ok else "**no**")
        print(f"| {name} | {target} | {got or 'not measured'} | {met} | {note} |")


if __name__ == "__main__":
    main()
