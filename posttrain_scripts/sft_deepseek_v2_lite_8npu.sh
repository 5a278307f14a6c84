#!/bin/bash
# DeepSeek-V2-Lite full-parameter SFT on one 8-NPU node, from the released HF weights.
#   1. convert once:  python -c "from megatron_ascend.checkpointing.hf import convert_hf_to_ma; \
#                        convert_hf_to_ma('/data/DeepSeek-V2-Lite', '/ckpt/v2_lite_base', ep=8)"
#   2. preprocess:    python tools/preprocess_data.py --sft --input sft.jsonl --output-prefix /data/sft/v2lite \
#                        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /data/DeepSeek-V2-Lite --prompt-type auto
#   3. bash posttrain_scripts/sft_deepseek_v2_lite_8npu.sh          (DEVICE_TYPE=cuda for 8 GPUs)
#
# Layout: as pretraining (pretrain_scripts/pretrain_deepseek_v2_lite_8npu.sh): TP1 PP1 DP8 EP8, distributed
# optimizer; the checkpoint reshards on load, so the conversion layout does not have to match. SFT sequences
# are packed (--sft-packing) into 4K samples so the per-step token count stays close to pretraining.
#
# Knobs (environment; the defaults are the recipe): LR_WARMUP_ITERS, EP, SEQ_LEN, MBS, GBS, TRAIN_ITERS, EVAL_INTERVAL,
# EVAL_ITERS, SAVE_INTERVAL, LOG_INTERVAL, LOG_DIR, DEVICES_PER_NODE, plus the paths below.
# tests/test_launch_scripts.py runs this script shrunk (2 CPU processes, from the shrunk pretraining run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TYPE=${DEVICE_TYPE:-npu}
source pretrain_scripts/device_env.sh

HF_CONFIG=${HF_CONFIG:-/data/DeepSeek-V2-Lite/config.json}
TOKENIZER_PATH=${TOKENIZER_PATH:-/data/DeepSeek-V2-Lite}
DATA_PATH=${DATA_PATH:-/data/sft/v2lite}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-/ckpt/v2_lite_base}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-/ckpt/v2_lite_sft}
TB_DIR=${TB_DIR:-$CKPT_SAVE_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-.}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-50}
EP=${EP:-8}; SEQ_LEN=${SEQ_LEN:-4096}; MBS=${MBS:-1}; GBS=${GBS:-64}; TRAIN_ITERS=${TRAIN_ITERS:-2000}
EVAL_INTERVAL=${EVAL_INTERVAL:-200}; EVAL_ITERS=${EVAL_ITERS:-10}; SAVE_INTERVAL=${SAVE_INTERVAL:-500}
LOG_INTERVAL=${LOG_INTERVAL:-10}

MODEL_ARGS="--model-config $HF_CONFIG"
PARALLEL_ARGS="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size $EP \
    --expert-tensor-parallel-size 1 --use-distributed-optimizer \
    --recompute-granularity selective --recompute-modules mla_up_proj moe_act"
TRAIN_ARGS="--stage sft --load $CKPT_LOAD_DIR --seq-length $SEQ_LEN --micro-batch-size $MBS --global-batch-size $GBS \
    --train-iters $TRAIN_ITERS --bf16 --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters $LR_WARMUP_ITERS --lr-decay-style cosine \
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --moe-router-bias-update-rate 0"
DATA_ARGS="--data-path $DATA_PATH --split 98,2,0 --sft-packing --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model $TOKENIZER_PATH --make-vocab-size-divisible-by 1 --prompt-type auto"
OUTPUT_ARGS="--log-interval $LOG_INTERVAL --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS --save $CKPT_SAVE_DIR \
    --save-interval $SAVE_INTERVAL --tensorboard-dir $TB_DIR"

# shellcheck disable=SC2086
run_or_show megatron_ascend.posttrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS \
    2>&1 | tee "$LOG_DIR/logs_deepseek_v2_lite_sft.log"
