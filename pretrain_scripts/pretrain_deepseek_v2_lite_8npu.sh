#!/bin/bash
# DeepSeek-V2-Lite (15.7B total / 2.4B active) pretraining on one 8-NPU node (Atlas 800T A2, 8 x 910B 64 GB).
#   bash pretrain_scripts/pretrain_deepseek_v2_lite_8npu.sh            DEVICE_TYPE=cuda bash ... (8 GPUs)
#
# Layout: TP1 PP1 DP8, EP8 (expert-TP 1), distributed optimizer.
# * The model fits one device once the experts are spread: routed experts are ~14.4B of the 15.7B (26 MoE layers
#   x 64 experts x 3 x 2048 x 1408); EP8 leaves 8 experts per layer per device, ~1.8B params at 18 B/param
#   (expert-DP 1, so Adam is not sharded) = ~32 GB. The dense ~1.3B (MLA without q-LoRA, 1 dense layer, 2 shared
#   experts per layer, embeddings) is replicated over DP8 at 6 + 12/8 = 7.5 B/param = ~10 GB.
# * No TP: h = 2048 and 16 heads make TP GEMMs too small to pay for their all-reduces inside one node; no PP:
#   27 layers fit, and PP would add a bubble for nothing. Selective recompute of the MLA up-projections and the
#   expert activations keeps a 4K micro-batch well inside the remaining ~20 GB.
#
# Knobs (environment; the defaults are the recipe): LR_WARMUP_ITERS, EP, SEQ_LEN, MBS, GBS, TRAIN_ITERS, EVAL_INTERVAL,
# EVAL_ITERS, SAVE_INTERVAL, LOG_INTERVAL, LOG_DIR, DEVICES_PER_NODE, plus the paths below.
# tests/test_launch_scripts.py runs this script shrunk (2 CPU processes, a tiny config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TYPE=${DEVICE_TYPE:-npu}
source pretrain_scripts/device_env.sh

HF_CONFIG=${HF_CONFIG:-/data/DeepSeek-V2-Lite/config.json}
TOKENIZER_PATH=${TOKENIZER_PATH:-/data/DeepSeek-V2-Lite}
DATA_PATH=${DATA_PATH:-/data/pretrain/corpus_text_document}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-/ckpt/deepseek_v2_lite}
TB_DIR=${TB_DIR:-$CKPT_SAVE_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-.}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-2000}
EP=${EP:-8}; SEQ_LEN=${SEQ_LEN:-4096}; MBS=${MBS:-1}; GBS=${GBS:-256}; TRAIN_ITERS=${TRAIN_ITERS:-50000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}; EVAL_ITERS=${EVAL_ITERS:-10}; SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}

MODEL_ARGS="--model-config $HF_CONFIG --moe-aux-loss-coeff 1e-3"
PARALLEL_ARGS="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size $EP \
    --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce \
    --recompute-granularity selective --recompute-modules mla_up_proj moe_act"
TRAIN_ARGS="--seq-length $SEQ_LEN --micro-batch-size $MBS --global-batch-size $GBS --train-iters $TRAIN_ITERS --bf16 \
    --lr 4.2e-4 --min-lr 4.2e-5 --lr-warmup-iters $LR_WARMUP_ITERS --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --adam-beta1 0.9 --adam-beta2 0.95"
DATA_ARGS="--data-path $DATA_PATH --split 999,1,0 --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model $TOKENIZER_PATH --make-vocab-size-divisible-by 1"
OUTPUT_ARGS="--log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS \
    --save $CKPT_SAVE_DIR --load $CKPT_SAVE_DIR --save-interval $SAVE_INTERVAL --save-retain 3 --tensorboard-dir $TB_DIR"

# shellcheck disable=SC2086
run_or_show megatron_ascend.pretrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS \
    2>&1 | tee "$LOG_DIR/logs_deepseek_v2_lite.log"
