#!/bin/bash
# DeepSeek-V3 671B pretraining on 512 Ascend 910B (64 Atlas 800T A2 nodes x 8), 4K sequences.
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0> bash pretrain_scripts/pretrain_deepseek_v3_671b_ascend.sh
#   DEVICE_TYPE=cuda ... (the same job on 512 NVIDIA GPUs: only the environment block changes)
#   SHOW_LAYOUT=1 NNODES=64 bash pretrain_scripts/pretrain_deepseek_v3_671b_ascend.sh   (print the rank layout)
#
# Layout: TP4 x PP8 x DP16 = 512, EP32 with expert-TP 1 (EP x expert-DP = 32 x 2 = the 64 ranks of a stage).
# * PP8: 61 layers as 7 | 8 x 6 | 6 (--decoder-first/last-pipeline-num-layers); the last stage also holds the
#   MTP layer and the 129K-vocab head, so it gets one layer fewer than the middle stages.
# * EP32, expert-TP 1: 256 routed experts / 32 = 8 experts per device; routed weights are ~654B of the 671B, i.e.
#   ~82B per stage, ~2.6B per device; at 12 B/param (bf16 param + fp32 grad + fp32 master + Adam over
#   expert-DP 2 with the distributed optimizer) that is ~31 GB. The dense part (MLA, dense FFN, shared experts,
#   embeddings; ~13B) is split TP4 x PP8, ~0.4B per device at 6 + 12/16 B/param (~3 GB).
# * TP4 + sequence parallel keep MLA activations and the dense GEMMs per device small; with full recompute of one
#   layer per stage (and recompute of the MLA up-projections) a 4K micro-batch fits the remaining ~25 GB of 64 GB.
# * GBS 3840 = 240 micro-batches per DP rank, so the 1F1B bubble is (p-1)/(m+p-1) = 7/247 = 2.8%.
# This mirrors MindSpeed-LLM's published 512-device V3 layout (TP4 PP8 EP32) minus its DualPipe / swap
# optimizer features, which this library does not have.
#
# Knobs (environment; the defaults are the recipe): LR_WARMUP_ITERS, TP, PP, EP, FIRST_STAGE_LAYERS, LAST_STAGE_LAYERS, SEQ_LEN,
# MBS, GBS, TRAIN_ITERS, EVAL_INTERVAL, EVAL_ITERS, SAVE_INTERVAL, LOG_DIR, plus the paths below.
# tests/test_launch_scripts.py runs this script shrunk (4 CPU processes, a tiny config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE_TYPE=${DEVICE_TYPE:-npu}
NNODES=${NNODES:-64}
source pretrain_scripts/device_env.sh

HF_CONFIG=${HF_CONFIG:-/data/DeepSeek-V3/config.json}        # the released config.json
TOKENIZER_PATH=${TOKENIZER_PATH:-/data/DeepSeek-V3}           # tokenizer.json + tokenizer_config.json
DATA_PATH=${DATA_PATH:-/data/pretrain/corpus_text_document}   # tools/preprocess_data.py output prefix
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-/ckpt/deepseek_v3_671b}
TB_DIR=${TB_DIR:-$CKPT_SAVE_DIR/tensorboard}
LOG_DIR=${LOG_DIR:-.}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-2000}
TP=${TP:-4}; PP=${PP:-8}; EP=${EP:-32}
FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS:-7}; LAST_STAGE_LAYERS=${LAST_STAGE_LAYERS:-6}
SEQ_LEN=${SEQ_LEN:-4096}; MBS=${MBS:-1}; GBS=${GBS:-3840}; TRAIN_ITERS=${TRAIN_ITERS:-200000}
EVAL_INTERVAL=${EVAL_INTERVAL:-2000}; EVAL_ITERS=${EVAL_ITERS:-10}; SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

MODEL_ARGS="--model-config $HF_CONFIG --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 \
    --moe-aux-loss-coeff 1e-4 --moe-router-bias-update-rate 1e-3 --init-method-std 0.006"
PARALLEL_ARGS="--tensor-model-parallel-size $TP --sequence-parallel --pipeline-model-parallel-size $PP \
    --decoder-first-pipeline-num-layers $FIRST_STAGE_LAYERS --decoder-last-pipeline-num-layers $LAST_STAGE_LAYERS \
    --expert-model-parallel-size $EP --expert-tensor-parallel-size 1 --use-distributed-optimizer \
    --overlap-grad-reduce --recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
TRAIN_ARGS="--seq-length $SEQ_LEN --micro-batch-size $MBS --global-batch-size $GBS --train-iters $TRAIN_ITERS --bf16 \
    --lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters $LR_WARMUP_ITERS --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --adam-beta1 0.9 --adam-beta2 0.95"
DATA_ARGS="--data-path $DATA_PATH --split 999,1,0 --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model $TOKENIZER_PATH --make-vocab-size-divisible-by 1"
OUTPUT_ARGS="--log-interval 1 --eval-interval $EVAL_INTERVAL --eval-iters $EVAL_ITERS --save $CKPT_SAVE_DIR \
    --load $CKPT_SAVE_DIR --save-interval $SAVE_INTERVAL --save-retain 3 --tensorboard-dir $TB_DIR"

# shellcheck disable=SC2086
run_or_show megatron_ascend.pretrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS \
    2>&1 | tee "$LOG_DIR/logs_deepseek_v3_671b_node${NODE_RANK}.log"
