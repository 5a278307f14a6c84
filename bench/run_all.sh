#!/usr/bin/env bash
# Run every issue-11 benchmark and write docs/BENCHMARKS.md (target table, reading = bench/reading.md, figures,
# the machine, the commands).
#   bash bench/run_all.sh [reps]        (CPU; takes several minutes on 2 cores)
set -u
cd "$(dirname "$0")/.."
REPS=${1:-6}
OUT=docs/BENCHMARKS.md
TMP=$(mktemp -d)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
run() {  # name, command...
  local name=$1; shift
  echo "running: $*" >&2
  { echo "### $name"; echo; echo '```'; echo "\$ $*"; "$@" 2>&1 | grep -v -e Warning -e 'return func' -e USDT; echo '```'; echo; } > "$TMP/$name.md"
}
run vs_transformers python bench/vs_transformers.py --reps "$REPS"
run v4_vs_transformers python bench/v4_vs_transformers.py --reps "$REPS"
run mfu python bench/mfu.py --reps "$REPS" --profile
run breakdown_mfu python bench/breakdown.py --config mfu
run breakdown_small python bench/breakdown.py --config small
run comm_volume python bench/comm_volume.py
run memory python bench/memory.py
run recompute python bench/recompute.py
run pipeline_bubble python bench/pipeline_bubble.py
run grad_overlap python bench/grad_overlap.py
run scaling python bench/scaling.py --reps 3
run grouped_fallback_memory python bench/grouped_fallback_memory.py
run v4_memory python bench/v4_memory.py
run planner_v3 python tools/plan.py --preset v3-2048-h800 --top 10
run planner_v4pro python tools/plan.py --preset v4pro-1024-910c --top 10
{
  echo "# Benchmarks (issue 11)"
  echo
  echo "Written by \`bash bench/run_all.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'). CPU timings on a shared machine are"
  echo "noisy: read the IQR and the load average below; ratios of interleaved runs are more stable than absolutes."
  echo "The communication-volume and memory figures are deterministic."
  echo
  echo "## Targets (issue 11), from this run (\`python bench/summary.py\` over the outputs below)"
  echo
  python bench/summary.py "$TMP"
  echo
  cat bench/reading.md
  echo
  cat bench/reference/results.md
  echo
  echo "## Machine"
  echo
  echo '```'
  echo "nproc: $(nproc)   load average before: $LOAD_BEFORE   after: $(cut -d' ' -f1-3 /proc/loadavg)"
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|MHz|L2|L3' || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'threads', torch.get_num_threads(), '| transformers', transformers.__version__)"
  echo '```'
  echo
  echo "## Results"
  echo
  cat "$TMP"/vs_transformers.md "$TMP"/v4_vs_transformers.md "$TMP"/mfu.md "$TMP"/breakdown_mfu.md "$TMP"/breakdown_small.md "$TMP"/comm_volume.md "$TMP"/memory.md "$TMP"/recompute.md "$TMP"/pipeline_bubble.md "$TMP"/grad_overlap.md "$TMP"/scaling.md "$TMP"/grouped_fallback_memory.md "$TMP"/v4_memory.md "$TMP"/planner_v3.md "$TMP"/planner_v4pro.md
} > "$OUT"
rm -rf "$TMP"
echo "wrote $OUT" >&2
