#!/bin/bash
# Quickstart SFT: full-parameter supervised fine-tuning of the quickstart checkpoint on a task whose answers can
# be checked, with held-out exact-match accuracy before and after.
#
#   bash pretrain_scripts/quickstart.sh && bash posttrain_scripts/quickstart_sft.sh
#
# The task (QUICKSTART_SFT_TASK): copy (default) or reverse a list of QUICKSTART_SFT_LEN (4) space-separated
# letters: "Repeat: c a f b" -> "c a f b" ("Reverse: c a f b" -> "b f a c"). The pretrained model answers with
# Python code (it has only seen the standard library), so exact match starts at 0. Reversal is harder: this tiny
# model needs far more than 300 iterations for it, so copy is the default. The script writes the training set
# (alpaca JSONL) and a disjoint held-out set, preprocesses the training set with the DeepSeek chat
# template (tools/preprocess_data.py --sft: loss on assistant tokens only), measures exact match on the held-out
# set with greedy decoding (python -m megatron_ascend.training.generate, one process, the checkpoint resharded
# to TP1 PP1 on load), fine-tunes at the pretraining layout (TP2 PP2 EP2 DP2, distributed optimizer, 8 gloo
# processes; --load implies --finetune: fresh optimizer and iteration count), then measures again.
#
# Knobs: QUICKSTART_DIR (the pretraining outputs, default ./quickstart_run), QUICKSTART_SFT_ITERS (300),
# QUICKSTART_EVAL_LIMIT (200 held-out examples), QUICKSTART_SKIP_INSTALL=1, DEVICE_TYPE, GPUS_PER_NODE, MASTER_PORT.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python}
OUT=${QUICKSTART_DIR:-$REPO/quickstart_run}
ITERS=${QUICKSTART_SFT_ITERS:-300}
TASK=${QUICKSTART_SFT_TASK:-copy}   # copy | reverse
EVAL_LIMIT=${QUICKSTART_EVAL_LIMIT:-200}
DEVICE_TYPE=${DEVICE_TYPE:-cpu}
export MEGATRON_ASCEND_DEVICE=$DEVICE_TYPE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PRETRAINED=$OUT/checkpoints
TOKENIZER=$OUT/tokenizer/stdlib_sp.model
if [ ! -f "$PRETRAINED/latest_checkpointed_iteration.txt" ] && ! ls -d "$PRETRAINED"/iter_* >/dev/null 2>&1; then
  echo "[sft] no pretrained checkpoint under $PRETRAINED; running pretrain_scripts/quickstart.sh first"
  QUICKSTART_DIR=$OUT bash pretrain_scripts/quickstart.sh
fi

# ---- 1. instruction data with checkable answers ---------------------------------------------------------------
SFT=$OUT/sft
mkdir -p "$SFT"
$PYTHON - "$SFT" "$TASK" <<'EOF'
import json, os, random, string, sys
out, task = sys.argv[1], sys.argv[2]
rng = random.Random(0)
seen, rows = set(), []
while len(rows) < 3200:
    n = int(os.environ.get("QUICKSTART_SFT_LEN", "4"))
    letters = tuple(rng.choice(string.ascii_lowercase[:12]) for _ in range(n))
    if letters in seen:
        continue
    seen.add(letters)
    answer = reversed(letters) if task == "reverse" else letters
    rows.append({"instruction": ("Reverse: " if task == "reverse" else "Repeat: ") + " ".join(letters),
                 "output": " ".join(answer)})
for name, part in (("train", rows[:3000]), ("test", rows[3000:])):
    with open(os.path.join(out, f"{task}_{name}.jsonl"), "w") as f:
        for r in part:
            f.write(json.dumps(r) + "\n")
print(f"[sft] task '{task}': {out}/{task}_train.jsonl (3000), {out}/{task}_test.jsonl (200, disjoint)")
EOF
$PYTHON tools/preprocess_data.py --sft --input "$SFT/${TASK}_train.jsonl" --output-prefix "$SFT/$TASK" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" --prompt-type deepseek --no-progress

EVAL="$PYTHON -m megatron_ascend.training.generate --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model $TOKENIZER --eval-data $SFT/${TASK}_test.jsonl --prompt-type deepseek --max-new-tokens 12 \
    --limit $EVAL_LIMIT"
# shellcheck disable=SC2086
$EVAL --load "$PRETRAINED" --label "before SFT" --output "$SFT/accuracy_before.json"

# ---- 2. full-parameter SFT at the pretraining layout -----------------------------------------------------------
source "$REPO/pretrain_scripts/quickstart_model.sh"  # the same architecture and layout as pretraining
CKPT_SAVE_DIR=$OUT/sft_checkpoints
TB_DIR=$OUT/sft_tensorboard
rm -rf "$CKPT_SAVE_DIR" "$TB_DIR"
TRAIN_ARGS="--stage sft --load $PRETRAINED --seq-length 32 --micro-batch-size 8 --global-batch-size 32 \
    --train-iters $ITERS --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( ITERS / 30 > 0 ? ITERS / 30 : 1 )) --lr-decay-style cosine --weight-decay 0.01 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999 --seed 1234"
DATA_ARGS="--data-path $SFT/$TASK --split 95,5,0 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model $TOKENIZER --prompt-type deepseek"
OUTPUT_ARGS="--log-interval 10 --eval-interval $(( ITERS / 3 > 0 ? ITERS / 3 : 1 )) --eval-iters 2 \
    --save $CKPT_SAVE_DIR --save-interval $ITERS --tensorboard-dir $TB_DIR"
echo "[sft] fine-tuning $ITERS iterations on $GPUS_PER_NODE processes ($DEVICE_TYPE) ..."
# shellcheck disable=SC2086
torchrun $DISTRIBUTED_ARGS -m megatron_ascend.posttrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS \
    $OUTPUT_ARGS 2>&1 | grep --line-buffered -v "^W[0-9]\{4\}\|^\*\*\*\*\|OMP_NUM_THREADS" | tee "$OUT/sft.log"

# ---- 3. accuracy after -----------------------------------------------------------------------------------------
# shellcheck disable=SC2086
$EVAL --load "$CKPT_SAVE_DIR" --label "after SFT" --output "$SFT/accuracy_after.json"
$PYTHON tools/run_report.py "$TB_DIR" --labels sft --out "$OUT/sft_report" >/dev/null
$PYTHON - "$SFT" <<'EOF'
import json, os, sys
b = json.load(open(os.path.join(sys.argv[1], "accuracy_before.json")))
a = json.load(open(os.path.join(sys.argv[1], "accuracy_after.json")))
print(f"[sft] held-out exact match: {b['correct']}/{b['total']} = {b['accuracy']:.3f} before -> "
      f"{a['correct']}/{a['total']} = {a['accuracy']:.3f} after")
EOF
echo "[sft] checkpoint: $CKPT_SAVE_DIR   TensorBoard: $TB_DIR   report: $OUT/sft_report/index.html"
