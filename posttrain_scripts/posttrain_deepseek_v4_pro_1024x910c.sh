#!/bin/bash
# DeepSeek-V4-Pro (1.6T) full-parameter post-training on 1,024 Ascend 910C (128 A3 nodes; each 910C is two
# dies, so the job has 2,048 devices, 16 per node).
#
#   SHOW_LAYOUT=1 bash posttrain_scripts/posttrain_deepseek_v4_pro_1024x910c.sh   prints the layout, starts nothing.
#   (DEVICE_TYPE=cuda runs the same recipe on NVIDIA GPUs: DEVICES_PER_NODE=8 NNODES=256.)
#
# Layout, from the planner (tools/plan.py; the device table lists a 910C per die, 376 TFLOP/s bf16, 64 GiB):
#   $ python tools/plan.py --model-config bench/reference/models/v4-pro.json --device Ascend910C \
#       --num-devices 2048 --seq-length 8192 --global-batch-size 4096
#   TP8 PP16 EP2 ETP8 DP16 SP distopt rc=full mbs1 first/last=4/1   352 tok/s/dev 115 TFLOP/s  step 46.49 s |
#   58.2 GiB peak = 46.9 model states + 7.3 activations (stage 0; + 4 GiB reserve)  (best of 4716 layouts, 243 fit)
#   runner-up: TP8 PP16 EP16 DP16 (expert-TP 1)  346 tok/s/dev, 57.0 GiB: the same speed within the model's error,
#   EXPERT_TP=1 EP=16 selects it.
# * TP8 + SP inside a node: 128 query heads / 8 and o_groups 16 / 8 per rank; V4's one shared KV head, its
#   compressors and the indexer keys are replicated over TP (the planner counts them so).
# * PP16: 61 layers as 4 | 14 x 4 | 1 (the last stage also holds the MTP block and the head); 1F1B, 16
#   micro-batches of 1 x 8K tokens in flight on stage 0 (GBS 4096 = 256 per DP rank, bubble 5.5 %).
# * Full recompute: each layer keeps only its 4 mHC streams; the eight fastest layouts that fit all recompute
#   fully (the mHC mixings and V4 attention keep many times the streams per layer: docs/V4.md, docs/PLANNER.md).
# * Samples are not packed (V4 refuses --sft-packing: its compressed attention has no per-segment form).
#
# Knobs (environment; the defaults are the recipe): LR_WARMUP_ITERS, TP, PP, EP, EXPERT_TP, FIRST_STAGE_LAYERS,
# LAST_STAGE_LAYERS, SEQ_LEN, MBS, GBS, TRAIN_ITERS, LOG_DIR, plus the paths below. tests/test_launch_scripts.py
# checks that its flags parse and build the configs and the layout (SHOW_LAYOUT=1, shrunk).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TYPE=${DEVICE_TYPE:-npu}
DEVICES_PER_NODE=${DEVICES_PER_NODE:-16}
NNODES=${NNODES:-128}
source pretrain_scripts/device_env.sh

HF_CONFIG=${HF_CONFIG:-/data/DeepSeek-V4-Pro/config.json}
TOKENIZER_PATH=${TOKENIZER_PATH:-/data/DeepSeek-V4-Pro}
DATA_PATH=${DATA_PATH:-/data/sft/v4pro}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-/ckpt/v4_pro_base}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-/ckpt/v4_pro_sft}
TB_DIR=${TB_DIR:-$CKPT_SAVE_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-.}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-100}
TP=${TP:-8}; PP=${PP:-16}; EP=${EP:-2}; EXPERT_TP=${EXPERT_TP:-8}
FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS:-4}; LAST_STAGE_LAYERS=${LAST_STAGE_LAYERS:-1}
SEQ_LEN=${SEQ_LEN:-8192}; MBS=${MBS:-1}; GBS=${GBS:-4096}; TRAIN_ITERS=${TRAIN_ITERS:-3000}

MODEL_ARGS="--model-config $HF_CONFIG --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1"
PARALLEL_ARGS="--tensor-model-parallel-size $TP --sequence-parallel --pipeline-model-parallel-size $PP \
    --decoder-first-pipeline-num-layers $FIRST_STAGE_LAYERS --decoder-last-pipeline-num-layers $LAST_STAGE_LAYERS \
    --expert-model-parallel-size $EP --expert-tensor-parallel-size $EXPERT_TP --use-distributed-optimizer \
    --overlap-grad-reduce --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
TRAIN_ARGS="--stage sft --load $CKPT_LOAD_DIR --seq-length $SEQ_LEN --micro-batch-size $MBS --global-batch-size $GBS \
    --train-iters $TRAIN_ITERS --bf16 --lr 5e-6 --min-lr 5e-7 --lr-warmup-iters $LR_WARMUP_ITERS --lr-decay-style cosine \
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --moe-router-bias-update-rate 0"
DATA_ARGS="--data-path $DATA_PATH --split 99,1,0 --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model $TOKENIZER_PATH --make-vocab-size-divisible-by 1 --prompt-type auto"
OUTPUT_ARGS="--log-interval 1 --eval-interval 500 --eval-iters 5 --save $CKPT_SAVE_DIR --save-interval 250 \
    --save-retain 2 --tensorboard-dir $TB_DIR"

# shellcheck disable=SC2086
run_or_show megatron_ascend.posttrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS \
    2>&1 | tee "$LOG_DIR/logs_deepseek_v4_pro_sft_node${NODE_RANK}.log"
