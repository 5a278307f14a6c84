#!/bin/bash
# Run one reference recipe (bench/reference/recipes/RECIPE.sh): build its data (bench/reference/make_data.py,
# byte-identical on every machine), launch torchrun with the recipe's model, layout and schedule, and write a
# run report. docs/REPRODUCING.md is the guide.
#
#   bash bench/reference/run.sh RECIPE                   # e.g. cpu-tiny, v2-lite-8, v4-pro-1024-sft
#   bash bench/reference/run.sh --list                   # the recipes and their one-line descriptions
#
# Environment (each is recorded in the run's metadata, $MEGATRON_ASCEND_RECIPE):
#   DEVICE_TYPE   npu | cuda | cpu (default: the recipe's); the training flags do not change with it
#   SEED          training seed (default: the recipe's); two seeds on one machine make the noise band
#   PRECISION     fp32 | bf16 (default: the recipe's)
#   LAYOUT        plan (default: the layout tools/plan.py chose, in the recipe's header) or another layout the
#                 recipe names (RECIPE_LAYOUTS)
#   OUT           run directory (default reference_runs/RECIPE/LAYOUT-PRECISION-sSEED[-DEVICE_TYPE]); the
#                 TensorBoard logs, run_metadata.json and rank_stats.jsonl go to OUT/tensorboard
#   DATA_DIR      where data is built (default reference_data/); reused when its stamp matches
#   LOAD          SFT recipes: the pretrained checkpoint (default: the recipe's RECIPE_LOAD)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT DEVICES_PER_NODE   multi-node launch (torchrun's)
#   SHOW_LAYOUT=1 print the rank layout and exit;  DRY_RUN=1 print the command and exit;  REPORT=0 no run report
#   MAX_ITERS=N   stop after N iterations (--exit-interval: the LR schedule stays the recipe's, so those steps
#                 equal a full run's); the metadata marks the run "shortened" and
#                 tools/compare_runs.py refuses to compare it with a full run (its recipe differs)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python}
RECIPES=$REPO/bench/reference/recipes

if [ "${1:-}" = "--list" ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ -z "${1:-}" ]; then
  echo "usage: bash bench/reference/run.sh RECIPE   (docs/REPRODUCING.md)"
  for f in "$RECIPES"/*.sh; do
    printf "  %-22s %s\n" "$(basename "$f" .sh)" "$(sed -n '1s/^# *//p' "$f")"
  done
  [ -z "${1:-}" ] && exit 2 || exit 0
fi
RECIPE=$1
RECIPE_FILE=$RECIPES/$RECIPE.sh
if [ ! -f "$RECIPE_FILE" ]; then
  echo "error: no recipe $RECIPE; bash bench/reference/run.sh --list shows them" >&2
  exit 2
fi

declare -A RECIPE_LAYOUTS
RECIPE_LOAD=""
RECIPE_TARGET_LOSS=""
RECIPE_EXIT_AT_LOSS=""
RECIPE_EXTRA_ARGS=""
RECIPE_DATA_ARGS=""   # extra make_data.py flags; RECIPE_DATA_TAG names them in the data directory
RECIPE_DATA_TAG=""
# shellcheck disable=SC1090
source "$RECIPE_FILE"

DEVICE_TYPE=${DEVICE_TYPE:-$RECIPE_DEVICE_TYPE}
SEED=${SEED:-$RECIPE_SEED}
PRECISION=${PRECISION:-$RECIPE_PRECISION}
LAYOUT=${LAYOUT:-plan}
DEVICES_PER_NODE=${DEVICES_PER_NODE:-$RECIPE_DEVICES_PER_NODE}
if [ -z "${RECIPE_LAYOUTS[$LAYOUT]+set}" ]; then
  echo "error: recipe $RECIPE has no layout '$LAYOUT'; it has: ${!RECIPE_LAYOUTS[*]}" >&2
  exit 2
fi
case "$PRECISION" in
  fp32) PRECISION_ARGS="" ;;
  bf16) PRECISION_ARGS="--bf16" ;;
  *) echo "error: PRECISION=$PRECISION is unknown; use fp32 or bf16" >&2; exit 2 ;;
esac
NNODES=${NNODES:-$(( RECIPE_DEVICES / DEVICES_PER_NODE > 0 ? RECIPE_DEVICES / DEVICES_PER_NODE : 1 ))}
if [ $(( NNODES * DEVICES_PER_NODE )) -ne "$RECIPE_DEVICES" ]; then
  echo "error: recipe $RECIPE runs on $RECIPE_DEVICES devices; NNODES=$NNODES x DEVICES_PER_NODE=$DEVICES_PER_NODE" \
       "= $(( NNODES * DEVICES_PER_NODE )); set them so that the product is $RECIPE_DEVICES" >&2
  exit 2
fi
export DEVICES_PER_NODE NNODES
source "$REPO/pretrain_scripts/device_env.sh"

TAG=$LAYOUT-$PRECISION-s$SEED
[ "$DEVICE_TYPE" != "$RECIPE_DEVICE_TYPE" ] && TAG=$TAG-$DEVICE_TYPE
OUT=${OUT:-$REPO/reference_runs/$RECIPE/$TAG}
DATA_DIR=${DATA_DIR:-$REPO/reference_data}
TOKENS_PER_ITER=$(( RECIPE_GBS * RECIPE_SEQ ))
ITERS=$(( RECIPE_TRAIN_TOKENS / TOKENS_PER_ITER ))
SHORTENED=false
SHORT_ARGS=""
if [ -n "${MAX_ITERS:-}" ] && [ "$MAX_ITERS" -lt "$ITERS" ]; then
  SHORT_ARGS="--exit-interval $MAX_ITERS"  # the schedule stays the recipe's: the first steps equal a full run's
  SHORTENED=true
fi

# ---- data: built from a seed by a versioned generator (byte-identical everywhere) --------------------------
DATA_NAME=$RECIPE_DATA_KIND-v$(sed -n 's/^VERSION = \([0-9]*\)$/\1/p' bench/reference/make_data.py)
DATA_NAME=$DATA_NAME-s$RECIPE_DATA_SEED-n$RECIPE_DATA_DOCS-V$RECIPE_DATA_VOCAB${RECIPE_DATA_TAG:+-$RECIPE_DATA_TAG}
DATA_PREFIX=$DATA_DIR/$DATA_NAME/synth
if [ "${SHOW_LAYOUT:-0}" != "1" ] && [ "${DRY_RUN:-0}" != "1" ] && [ ! -s "$DATA_PREFIX.json" ]; then
  if [ "${NODE_RANK:-0}" = "0" ]; then
    echo "[reference] building data $DATA_NAME (make_data.py $RECIPE_DATA_KIND) ..."
    $PYTHON bench/reference/make_data.py "$RECIPE_DATA_KIND" --output-prefix "$DATA_PREFIX" \
        --seed "$RECIPE_DATA_SEED" --num-docs "$RECIPE_DATA_DOCS" --vocab-size "$RECIPE_DATA_VOCAB" $RECIPE_DATA_ARGS
  else
    echo "[reference] waiting for node 0 to build $DATA_PREFIX (shared file system), or build it here with" \
         "make_data.py: it is byte-identical" >&2
    while [ ! -s "$DATA_PREFIX.json" ]; do sleep 10; done
  fi
fi
if [ "$RECIPE_DATA_KIND" = "pretrain" ]; then DATA_PATH=${DATA_PREFIX}_text_document; else DATA_PATH=$DATA_PREFIX; fi

# ---- the run ----------------------------------------------------------------------------------------------------
export MEGATRON_ASCEND_RECIPE="{\"name\": \"$RECIPE\", \"version\": $RECIPE_VERSION, \"stage\": \"$RECIPE_STAGE\", \
\"layout\": \"$LAYOUT\", \"precision\": \"$PRECISION\", \"train_tokens\": $RECIPE_TRAIN_TOKENS, \
\"stop\": \"$RECIPE_STOP\", \"target_loss\": ${RECIPE_TARGET_LOSS:-null}, \"shortened\": $SHORTENED, \
\"data\": \"$DATA_NAME\"}"
ENTRY=megatron_ascend.pretrain
STAGE_ARGS=""
if [ "$RECIPE_STAGE" = "sft" ]; then
  ENTRY=megatron_ascend.posttrain
  LOAD=${LOAD:-$RECIPE_LOAD}
  STAGE_ARGS="--load $LOAD --is-instruction-dataset"
  if [ "${SHOW_LAYOUT:-0}" != "1" ] && [ "${DRY_RUN:-0}" != "1" ] && [ ! -e "$LOAD" ]; then
    echo "error: recipe $RECIPE fine-tunes the checkpoint $LOAD, which does not exist; run its pretraining" \
         "recipe first ($RECIPE_LOAD_FROM) or set LOAD" >&2
    exit 2
  fi
fi
EXIT_ARGS=""
[ -n "$RECIPE_EXIT_AT_LOSS" ] && EXIT_ARGS="--exit-at-loss $RECIPE_EXIT_AT_LOSS --exit-at-loss-window 20"
ARGS="--model-config $REPO/bench/reference/models/$RECIPE_MODEL.json $RECIPE_MODEL_ARGS ${RECIPE_LAYOUTS[$LAYOUT]} \
    --seq-length $RECIPE_SEQ --global-batch-size $RECIPE_GBS --train-iters $ITERS --seed $SEED $PRECISION_ARGS \
    $RECIPE_OPT_ARGS --data-path $DATA_PATH --split $RECIPE_SPLIT \
    --log-interval $RECIPE_LOG_INTERVAL --eval-interval $RECIPE_EVAL_INTERVAL --eval-iters $RECIPE_EVAL_ITERS \
    --tensorboard-dir $OUT/tensorboard $EXIT_ARGS $SHORT_ARGS $STAGE_ARGS $RECIPE_EXTRA_ARGS"
[ "${RECIPE_SAVE:-0}" = "1" ] && ARGS="$ARGS --save $OUT/checkpoints --save-interval $ITERS"
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "MEGATRON_ASCEND_RECIPE='$MEGATRON_ASCEND_RECIPE'"
  # shellcheck disable=SC2086
  echo torchrun $DISTRIBUTED_ARGS -m $ENTRY $ARGS
  exit 0
fi
if [ "${SHOW_LAYOUT:-0}" = "1" ]; then
  # shellcheck disable=SC2086
  run_or_show $ENTRY $ARGS
  exit 0
fi
rm -rf "$OUT/tensorboard" "$OUT/checkpoints"
mkdir -p "$OUT"
echo "[reference] $RECIPE v$RECIPE_VERSION ($RECIPE_STAGE): $ITERS iterations x $TOKENS_PER_ITER tokens on" \
     "$RECIPE_DEVICES x $DEVICE_TYPE, layout $LAYOUT, $PRECISION, seed $SEED -> $OUT"
# shellcheck disable=SC2086
run_or_show $ENTRY $ARGS 2>&1 | { grep --line-buffered -v "^W[0-9]\{4\}\|^\*\*\*\*\|OMP_NUM_THREADS" || true; } \
    | tee "$OUT/train.log"
if [ "${REPORT:-1}" = "1" ] && [ "${NODE_RANK:-0}" = "0" ] && [ -d "$OUT/tensorboard" ] && \
    $PYTHON -c "import matplotlib" 2>/dev/null; then
  $PYTHON tools/run_report.py "$OUT/tensorboard" --labels "$RECIPE-$TAG" --out "$OUT/report" | head -3
fi
echo "[reference] done: $OUT/tensorboard (compare runs: python tools/compare_runs.py DIR_A DIR_B ...)"
