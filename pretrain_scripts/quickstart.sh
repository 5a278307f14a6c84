#!/bin/bash
# Quickstart: pretrain a tiny DeepSeek-V3-style MoE on 8 CPU processes, from nothing to a run report.
#
#   bash pretrain_scripts/quickstart.sh          # about 10 minutes on 2 cores
#
# What it does (every step prints where its output is):
#   1. installs megatron_ascend (pip install -e . with torch==2.13.0 pinned) unless it is importable already;
#   2. builds a corpus that exists on every machine: the Python standard library's top-level .py files;
#   3. trains a SentencePiece tokenizer on it (tools/train_tokenizer.py) and preprocesses it into a Megatron
#      indexed dataset (tools/preprocess_data.py);
#   4. pretrains a tiny DeepSeek-V3-style model -- MLA, 1 dense + 3 MoE layers with 8 routed experts (top-2,
#      2 groups, noaux_tc sigmoid routing with the aux-loss-free bias update) + 1 shared expert, one MTP layer --
#      with TP2 PP2 EP2 DP2 on 8 processes (torchrun --nproc_per_node 8, gloo) and the distributed optimizer,
#      evaluating every EVAL_INTERVAL iterations, writing TensorBoard logs and a checkpoint;
#   5. writes an HTML run report (tools/run_report.py) with loss / throughput / MFU / memory / MoE-balance plots.
#
# Knobs (environment): QUICKSTART_DIR (outputs, default ./quickstart_run), QUICKSTART_ITERS (300),
# QUICKSTART_SKIP_INSTALL=1, DEVICE_TYPE (cpu | npu | cuda; cpu here), GPUS_PER_NODE (8), MASTER_PORT.
# posttrain_scripts/quickstart_sft.sh fine-tunes the checkpoint this writes.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python}
OUT=${QUICKSTART_DIR:-$REPO/quickstart_run}
ITERS=${QUICKSTART_ITERS:-300}
EVAL_INTERVAL=${QUICKSTART_EVAL_INTERVAL:-$(( ITERS / 6 > 0 ? ITERS / 6 : 1 ))}
DEVICE_TYPE=${DEVICE_TYPE:-cpu}
export MEGATRON_ASCEND_DEVICE=$DEVICE_TYPE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

# ---- 1. install -----------------------------------------------------------------------------------------
if [ "${QUICKSTART_SKIP_INSTALL:-0}" != "1" ]; then
  if ! $PYTHON -c "import megatron_ascend, torch, sentencepiece, tensorboard, matplotlib" 2>/dev/null; then
    echo "[quickstart] installing megatron_ascend (torch==2.13.0) ..."
    $PYTHON -m pip install -q "torch==2.13.0" -e ".[tools]"
  fi
fi

# ---- 2. corpus: the standard library's own source -------------------------------------------------------
CORPUS=$OUT/corpus.jsonl
if [ ! -s "$CORPUS" ]; then
  $PYTHON - "$CORPUS" <<'EOF'
import glob, json, os, sys, sysconfig
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
with open(sys.argv[1], "w") as f:
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as g:
            f.write(json.dumps({"text": g.read()}) + "\n")
print(f"[quickstart] corpus: {len(files)} standard-library files -> {sys.argv[1]}")
EOF
fi

# ---- 3. tokenizer + preprocessing ------------------------------------------------------------------------
TOKENIZER=$OUT/tokenizer/stdlib_sp
if [ ! -s "$TOKENIZER.model" ]; then
  mkdir -p "$OUT/tokenizer"
  $PYTHON tools/train_tokenizer.py --input "$CORPUS" --model-prefix "$TOKENIZER" --vocab-size 2000 --num-threads 2
fi
DATA_PREFIX=$OUT/data/stdlib
if [ ! -s "${DATA_PREFIX}_text_document.bin" ]; then
  mkdir -p "$OUT/data"
  $PYTHON tools/preprocess_data.py --input "$CORPUS" --output-prefix "$DATA_PREFIX" \
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model" --append-eod --workers 2 \
      --no-progress
fi

# ---- 4. pretraining ----------------------------------------------------------------------------------------
source "$REPO/pretrain_scripts/quickstart_model.sh"
CKPT_SAVE_DIR=$OUT/checkpoints
TB_DIR=$OUT/tensorboard
rm -rf "$CKPT_SAVE_DIR" "$TB_DIR"

TRAIN_ARGS="--seq-length 128 --micro-batch-size 2 --global-batch-size 16 --train-iters $ITERS \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( ITERS / 20 + 1 )) --lr-decay-style cosine --weight-decay 0.1 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --seed 1234"
DATA_ARGS="--data-path ${DATA_PREFIX}_text_document --split 98,2,0 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model $TOKENIZER.model"
OUTPUT_ARGS="--log-interval $(( ITERS / 30 > 0 ? ITERS / 30 : 1 )) --eval-interval $EVAL_INTERVAL --eval-iters 4 \
    --save $CKPT_SAVE_DIR --save-interval $ITERS --tensorboard-dir $TB_DIR"

echo "[quickstart] pretraining $ITERS iterations on $GPUS_PER_NODE processes ($DEVICE_TYPE) ..."
# shellcheck disable=SC2086
torchrun $DISTRIBUTED_ARGS -m megatron_ascend.pretrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS \
    $OUTPUT_ARGS 2>&1 | grep --line-buffered -v "^W[0-9]\{4\}\|^\*\*\*\*\|OMP_NUM_THREADS" | tee "$OUT/pretrain.log"

# ---- 5. report ---------------------------------------------------------------------------------------------
$PYTHON tools/run_report.py "$TB_DIR" --labels quickstart --out "$OUT/report" | tee "$OUT/report.txt"
$PYTHON - "$OUT/report/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["runs"]["quickstart"]
print(f"[quickstart] validation loss {s['lm loss validation first']:.3f} -> {s['lm loss validation last']:.3f}, "
      f"train loss {s['lm loss first']:.3f} -> {s['lm loss last']:.3f}")
EOF
echo "[quickstart] TensorBoard logs: $TB_DIR  (tensorboard --logdir $TB_DIR)"
echo "[quickstart] checkpoint:       $CKPT_SAVE_DIR"
echo "[quickstart] run report:       $OUT/report/index.html"
echo "[quickstart] next: bash posttrain_scripts/quickstart_sft.sh   (SFT from this checkpoint)"
