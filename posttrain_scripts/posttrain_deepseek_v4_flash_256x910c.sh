#!/bin/bash
# DeepSeek-V4-Flash (284B / 13B active) full-parameter post-training on 256 Ascend 910C (32 A3 nodes; each 910C
# is two dies, so the job has 512 devices, 16 per node).
#
#   SHOW_LAYOUT=1 bash posttrain_scripts/posttrain_deepseek_v4_flash_256x910c.sh   prints the layout, starts nothing.
#
# Layout, from the planner (tools/plan.py; the device table lists a 910C per die, 376 TFLOP/s bf16, 64 GiB):
#   $ python tools/plan.py --model-config bench/reference/models/v4-flash.json --device Ascend910C \
#       --num-devices 512 --seq-length 8192 --global-batch-size 2048
#   TP8 PP8 EP16 DP8 SP distopt rc=selective mbs1 first/last=6/1   1433 tok/s/dev 129 TFLOP/s  step 22.87 s |
#   58.8 GiB peak = 21.9 model states + 32.9 activations (stage 0; + 4 GiB reserve)  (best of 4080 layouts, 352 fit)
#   next: TP4 PP8 EP4 ETP4 DP16 rc=full 1273 tok/s/dev at 32.9 GiB (RECOMPUTE=full TP=4 EP=4 EXPERT_TP=4 for
#   headroom: the selective layout leaves 2 GiB of the planner's 95 % line).
# * TP8 + SP inside a node: 64 query heads / 8 and o_groups 8 / 8 per rank; the shared KV head, compressors and
#   indexer keys are replicated over TP. EP16: 256 routed experts / 16 = 16 per device (expert-TP 1).
# * PP8: 43 layers as 6 | 6 x 6 | 1 (the last stage also holds the MTP block and the head); 1F1B, 8 micro-batches
#   of 1 x 8K tokens in flight on stage 0 (GBS 2048 = 256 per DP rank, bubble 2.7 %).
# * Selective recompute = layernorm + mhc + mla_up_proj + moe_act (the mHC mixing coefficients are recomputed
#   from the streams each mixing keeps anyway: the largest per-token saving of a V4 layer; docs/V4.md).
# * Samples are not packed (V4 refuses --sft-packing: its compressed attention has no per-segment form).
#
# Knobs (environment; the defaults are the recipe): LR_WARMUP_ITERS, TP, PP, EP, EXPERT_TP, RECOMPUTE,
# FIRST_STAGE_LAYERS, LAST_STAGE_LAYERS, SEQ_LEN, MBS, GBS, TRAIN_ITERS, LOG_DIR, plus the paths below.
# tests/test_launch_scripts.py checks that its flags parse and build the configs and the layout (SHOW_LAYOUT=1,
# shrunk).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TYPE=${DEVICE_TYPE:-npu}
DEVICES_PER_NODE=${DEVICES_PER_NODE:-16}
NNODES=${NNODES:-32}
source pretrain_scripts/device_env.sh

HF_CONFIG=${HF_CONFIG:-/data/DeepSeek-V4-Flash/config.json}
TOKENIZER_PATH=${TOKENIZER_PATH:-/data/DeepSeek-V4-Flash}
DATA_PATH=${DATA_PATH:-/data/sft/v4flash}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-/ckpt/v4_flash_base}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-/ckpt/v4_flash_sft}
TB_DIR=${TB_DIR:-$CKPT_SAVE_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-.}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-100}
TP=${TP:-8}; PP=${PP:-8}; EP=${EP:-16}; EXPERT_TP=${EXPERT_TP:-1}; RECOMPUTE=${RECOMPUTE:-selective}
FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS:-6}; LAST_STAGE_LAYERS=${LAST_STAGE_LAYERS:-1}
SEQ_LEN=${SEQ_LEN:-8192}; MBS=${MBS:-1}; GBS=${GBS:-2048}; TRAIN_ITERS=${TRAIN_ITERS:-3000}

MODEL_ARGS="--model-config $HF_CONFIG --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1"
PARALLEL_ARGS="--tensor-model-parallel-size $TP --sequence-parallel --pipeline-model-parallel-size $PP \
    --decoder-first-pipeline-num-layers $FIRST_STAGE_LAYERS --decoder-last-pipeline-num-layers $LAST_STAGE_LAYERS \
    --expert-model-parallel-size $EP --expert-tensor-parallel-size $EXPERT_TP --use-distributed-optimizer \
    --overlap-grad-reduce"
if [ "$RECOMPUTE" = "full" ]; then
  PARALLEL_ARGS="$PARALLEL_ARGS --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
else
  PARALLEL_ARGS="$PARALLEL_ARGS --recompute-granularity selective --recompute-modules layernorm mhc mla_up_proj moe_act"
fi
TRAIN_ARGS="--stage sft --load $CKPT_LOAD_DIR --seq-length $SEQ_LEN --micro-batch-size $MBS --global-batch-size $GBS \
    --train-iters $TRAIN_ITERS --bf16 --lr 5e-6 --min-lr 5e-7 --lr-warmup-iters $LR_WARMUP_ITERS --lr-decay-style cosine \
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --moe-router-bias-update-rate 0"
DATA_ARGS="--data-path $DATA_PATH --split 99,1,0 --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model $TOKENIZER_PATH --make-vocab-size-divisible-by 1 --prompt-type auto"
OUTPUT_ARGS="--log-interval 1 --eval-interval 500 --eval-iters 5 --save $CKPT_SAVE_DIR --save-interval 250 \
    --save-retain 2 --tensorboard-dir $TB_DIR"

# shellcheck disable=SC2086
run_or_show megatron_ascend.posttrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS \
    2>&1 | tee "$LOG_DIR/logs_deepseek_v4_flash_sft_node${NODE_RANK}.log"
