#!/usr/bin/env python3
"""Run the test suite (or a selection) under other CPU kernels and thread counts on one machine, N times each,
and print a pass/fail table with timings and how close the suite came to its tolerance bounds.

    python tests/run_cpu_matrix.py                              # whole suite, every configuration, once
    python tests/run_cpu_matrix.py --repeat 3 -- tests/test_wgrad.py -k overlap
    python tests/run_cpu_matrix.py --configs avx2,default --repeat 2

Configurations (each sets its variables and unsets the others of the set, so nothing leaks from the shell):
  native   the machine's best kernels (AVX-512 where the CPU has it), default thread counts
  avx2     ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (what an AVX2-only AMD EPYC runs)
  default  ATEN_CPU_CAPABILITY=default (ATen's scalar / non-vectorised kernels)
  avx512   ATEN_CPU_CAPABILITY=avx512 (only on a CPU with AVX-512)
  omp1     OMP_NUM_THREADS=1
  omp2     OMP_NUM_THREADS=2
The variables reach every process the suite starts: pytest-xdist workers and subprocesses inherit them, and
tests/harness.py's forkserver workers take the kernels from the environment and OMP_NUM_THREADS as their
intra-op thread count (1 when unset). Each run writes its tolerance checks to a log (MA_TOLERANCE_LOG); the
table's "worst" column is the largest measured-error / bound ratio of any assert_close / assert_rel (1.0 = at
the bound) and the check it came from. Exit status: 0 when every run passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGED = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")
CONFIGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "omp2": {"OMP_NUM_THREADS": "2"},
}
DEFAULT_CONFIGS = "native,avx2,default,omp1,omp2"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything after -- goes to pytest (default: -x -q -n 2 tests).")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS})")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (default 1)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it counts as failed")
    p.add_argument("--log-dir", default=None, help="keep each run's pytest output and tolerance log here")
    p.add_argument("pytest_args", nargs="*", help="pytest arguments (after --)")
    return p


def run_env(name):
    env = {k: v for k, v in os.environ.items() if k not in MANAGED}
    env.update(CONFIGS[name])
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def probe(env):
    """The kernels a process started with ``env`` really uses (a capability the CPU lacks is refused by ATen)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return r.stdout.strip() or f"probe failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:60]}"


def summary(out):
    """pytest's last count line ("3 failed, 300 passed, 1 skipped"), with or without its ===== frame."""
    m = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+|no tests ran)(?: in [\d.]+s.*)?$", out, re.M)
    return m[-1].strip() if m else "(no pytest summary)"


def worst(log):
    best = (0.0, "-")
    if os.path.exists(log):
        for line in open(log):
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 5 and parts[0] != "equal":
                r = float(parts[4])
                if r > best[0]:
                    best = (r, f"{parts[1][:60]}")
    return best


def main(argv=None):
    a = build_parser().parse_args(argv)
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        build_parser().error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    if a.repeat < 1:
        build_parser().error(f"--repeat {a.repeat}: give at least 1")
    pytest_args = a.pytest_args or ["-x", "-q", "-n", "2", "tests"]
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="ma_cpu_matrix_")
    os.makedirs(log_dir, exist_ok=True)
    rows, ok_all = [], True
    print(f"pytest {' '.join(pytest_args)}   (logs in {log_dir})", flush=True)
    for name in names:
        env = run_env(name)
        kern = probe(env)
        for i in range(1, a.repeat + 1):
            tag = f"{name}_{i}"
            tol_log = os.path.join(log_dir, f"{tag}.tolerance.tsv")
            if os.path.exists(tol_log):
                os.remove(tol_log)
            env["MA_TOLERANCE_LOG"] = tol_log
            t0 = time.monotonic()
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args],
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
                out, rc = r.stdout + r.stderr, r.returncode
            except subprocess.TimeoutExpired as e:
                out, rc = f"{e.stdout or ''}\ntimed out after {a.timeout:.0f}s", -1
            dt = time.monotonic() - t0
            with open(os.path.join(log_dir, f"{tag}.log"), "w") as f:
                f.write(out)
            passed = rc == 0
            ok_all &= passed
            ratio, where = worst(tol_log)
            rows.append((name, " ".join(f"{k}={v}" for k, v in CONFIGS[name].items()) or "(none)", kern, i,
                         "PASS" if passed else f"FAIL rc={rc}", summary(out), f"{dt:.0f}s", f"{ratio:.3f}", where))
            print(f"  {name} run {i}: {rows[-1][4]} ({rows[-1][5]}) in {dt:.0f}s, worst {ratio:.3f} {where}",
                  flush=True)
    head = ("config", "environment", "kernels threads", "run", "result", "pytest", "time", "worst", "at")
    widths = [max(len(str(r[j])) for r in rows + [head]) for j in range(len(head))]
    print()
    for r in [head] + rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
