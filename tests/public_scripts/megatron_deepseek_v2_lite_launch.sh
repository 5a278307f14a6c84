#!/bin/bash
# Launches Megatron-LM's DeepSeek-V2-Lite model configuration (DeepSeek-V2-Lite.sh beside this file, a shrunk copy)
# the way Megatron-LM's examples/post_training/modelopt/finetune.sh launches a conf (NVIDIA/Megatron-LM @
# d98e8a64ddf34856e74b24714e3bedb2f5a39553): source it, then `${LAUNCH_SCRIPT} <entry> ${MODEL_ARGS} <parallel
# sizes> --tokenizer-model ${TOKENIZER_MODEL} <data / train / optim / eval args>`, with finetune.sh's
# sample-based data arguments and its train / optimizer arguments. Written for megatron_ascend's tests (not
# copied): the entry point is -m megatron_ascend.pretrain, the data are a local preprocessed corpus instead of
# --finetune-hf-dataset, and sizes are tiny. Run from a scratch directory (see tests/test_public_scripts.py).
set -e
SCRIPT_DIR="$(dirname "$(readlink -f "$0")")"
source "${SCRIPT_DIR}/DeepSeek-V2-Lite.sh"

TP=${TP:-1}
ETP=${ETP:-${TP}}
EP=${EP:-2}
PP=${PP:-1}
LAUNCH_SCRIPT="torchrun --nproc_per_node ${NPROC:-2} --master_port ${MASTER_PORT:-29500}"

MLM_DATA_ARGS="--train-samples 8 --lr-decay-samples 8 --lr-warmup-samples 0 --split 100,0,0 \
    --data-path ./dataset/enwiki_text_document --tokenizer-type HuggingFaceTokenizer"
MLM_TRAIN_ARGS="--no-gradient-accumulation-fusion --reset-position-ids --reset-attention-mask --eod-mask-loss \
    --micro-batch-size 1 --global-batch-size 4 --attention-dropout 0.0 --hidden-dropout 0.0"
MLM_OPTIM_ARGS="--lr 5.0e-5 --min-lr 1.0e-7 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.0 \
    --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.010 --use-distributed-optimizer"
MLM_EVAL_ARGS="--eval-iters 1 --eval-interval 1000 --save-interval 1000 --log-interval 1"

# shellcheck disable=SC2086
${LAUNCH_SCRIPT} -m megatron_ascend.pretrain \
    ${MODEL_ARGS} \
    --tensor-model-parallel-size ${TP} \
    --expert-tensor-parallel-size ${ETP} \
    --expert-model-parallel-size ${EP} \
    --pipeline-model-parallel-size ${PP} \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --distributed-timeout-minutes 30 \
    --save ./ckpt_v2_lite \
    ${MLM_DATA_ARGS} \
    ${MLM_OPTIM_ARGS} \
    ${MLM_TRAIN_ARGS} \
    ${MLM_EVAL_ARGS}
