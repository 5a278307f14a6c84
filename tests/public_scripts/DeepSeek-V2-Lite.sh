#!/bin/bash
# Shrunk copy of NVIDIA/Megatron-LM:examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh @ d98e8a64ddf34856e74b24714e3bedb2f5a39553
# (copyright its authors; BSD-style licence of that repository). DeepSeek-V2-Lite model arguments (sourced by megatron_deepseek_v2_lite_launch.sh).
# Changed: the entry point (marked 'entry point'), sizes and paths (numbers / placeholder paths, all
# flags kept). Run by tests/test_public_scripts.py in a scratch directory holding ./logs, the tiny data
# and ./model_from_hf/deepseek3-hf (its tokenizer only).
# no entry point here

TOKENIZER_MODEL="./model_from_hf/deepseek3-hf"

MODEL_ARGS=" \
    --save-interval 100000 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --micro-batch-size 1 \
    --bf16 \
    --no-masked-softmax-fusion \
    --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --position-embedding-type rope \
    --no-rope-fusion \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --swiglu \
    --num-layers 3 \
    --hidden-size 64 \
    --ffn-hidden-size 128 \
    --num-attention-heads 4 \
    --kv-channels 16 \
    --multi-latent-attention \
    --kv-lora-rank 32 \
    --v-head-dim 16 \
    --qk-head-dim 16 \
    --qk-layernorm \
    --qk-pos-emb-head-dim 8 \
    --num-experts 8 \
    --moe-layer-freq ([0]+[1]*2) \
    --moe-ffn-hidden-size 32 \
    --moe-grouped-gemm \
    --moe-router-score-function softmax \
    --moe-router-topk 2 \
    --moe-router-topk-scaling-factor 1.0 \
    --moe-router-pre-softmax \
    --moe-shared-expert-intermediate-size 64 \
    --moe-aux-loss-coeff 1e-3 \
    --moe-token-dispatcher-type alltoall \
    --moe-token-drop-policy probs \
    --moe-router-load-balancing-type seq_aux_loss \
    --seq-length 32 \
    --max-position-embeddings 64 \
    --tokenizer-type HuggingFaceTokenizer \
    --make-vocab-size-divisible-by 128 \
    --attention-softmax-in-fp32 \
    --use-mcore-models \
    --rotary-percent 1.0 \
    --rotary-base 10000 \
    --rotary-scaling-factor 40 \
    --mscale 0.707 \
    --mscale-all-dim 0.707 \
    --sequence-parallel \
"
