#!/bin/bash
# Shrunk copy of Ascend/MindSpeed-LLM:examples/mcore/deepseek3/tune_deepseek3_671b_4k_full_ptd.sh @ c77308a14bfcb1aa7ca61da9c1aa24a893cb1b91
# (copyright its authors; BSD-style licence of that repository). DeepSeek-V3 full-parameter SFT.
# Changed: the entry point (marked 'entry point'), sizes and paths (numbers / placeholder paths, all
# flags kept). Run by tests/test_public_scripts.py in a scratch directory holding ./logs, the tiny data
# and ./model_from_hf/deepseek3-hf (a tiny HF tokenizer + DeepSeek-V3 checkpoint).
# entry point: posttrain_gpt.py -> -m megatron_ascend.posttrain



export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True
export HCCL_CONNECT_TIMEOUT=3600
export HCCL_EXEC_TIMEOUT=3600

NPUS_PER_NODE=2
MASTER_ADDR=localhost #主节点IP
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=1
NODE_RANK=0
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

CKPT_SAVE_DIR="./ckpt_sft"
DATA_PATH="./finetune_dataset/alpaca"
TOKENIZER_PATH="./model_from_hf/deepseek3-hf"
CKPT_LOAD_DIR="./model_from_hf/deepseek3-hf"

TP=1
PP=2
EP=1
CP=1
CP_TYPE='ulysses_cp_algo'

NUM_LAYERS=3
SEQ_LEN=32
MBS=1
GBS=4

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

MLA_ARGS="
    --multi-latent-attention \
    --qk-pos-emb-head-dim 8 \
    --qk-head-dim 16 \
    --q-lora-rank 32 \
    --kv-lora-rank 32 \
    --v-head-dim 16 \
    --qk-layernorm \
"

MOE_ARGS="
    --moe-grouped-gemm \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-permute-fusion \
    --first-k-dense-replace 1 \
    --moe-layer-freq 1 \
    --n-shared-experts 1 \
    --num-experts 8 \
    --moe-router-topk 2 \
    --moe-ffn-hidden-size 32 \
    --moe-router-load-balancing-type none \
    --moe-router-group-topk 1 \
    --moe-router-num-groups 2 \
    --moe-router-topk-scaling-factor 2.5 \
    --seq-aux \
    --norm-topk-prob \
    --moe-router-score-function sigmoid \
    --moe-router-enable-expert-bias \
"

ROPE_ARGS="
    --beta-fast 32 \
    --beta-slow 1 \
    --rope-scaling-factor 40 \
    --rope-scaling-mscale 1.0 \
    --rope-scaling-mscale-all-dim  1.0 \
    --rope-scaling-original-max-position-embeddings 4096 \
    --rope-scaling-type yarn
"

GPT_ARGS="
    --spec mindspeed_llm.tasks.models.spec.deepseek_spec layer_spec \
    --num-layer-list 1,2 \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 1 \
    --use-distributed-optimizer \
    --reuse-fp32-param \
    --use-flash-attn \
    --shape-order BNSD \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --sequence-parallel \
    --context-parallel-size ${CP} \
    --context-parallel-algo  ${CP_TYPE} \
    --num-layers ${NUM_LAYERS} \
    --hidden-size 64 \
    --ffn-hidden-size 128 \
    --num-attention-heads 4 \
    --tokenizer-type PretrainedFromHF  \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --seq-length ${SEQ_LEN} \
    --max-position-embeddings 163840 \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --make-vocab-size-divisible-by 1 \
    --lr 1.0e-5 \
    --train-iters 2 \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --init-method-std 0.02 \
    --hidden-dropout 0.0 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --use-fused-rotary-pos-emb \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --swiglu \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1.0e-7 \
    --weight-decay 1e-2 \
    --lr-warmup-iters 1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --initial-loss-scale 65536 \
    --vocab-size 512 \
    --padded-vocab-size 512 \
    --rotary-base 10000 \
    --norm-epsilon 1e-6 \
    --no-load-optim \
    --no-load-rng \
    --bf16 \
    --distributed-timeout-minutes 120 \
    --ckpt-format torch
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --handler-name AlpacaStyleInstructionHandler \
    --split 100,0,0
"

CKPT_ARGS="
    --enable-hf2mg-convert \
    --model-type-hf deepseek3
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 2 \
    --eval-interval 2 \
    --eval-iters 0 \
    --no-save-optim \
    --no-save-rng \
    --load $CKPT_LOAD_DIR \
    --save $CKPT_SAVE_DIR \
"


FINETUNE_ARGS="
    --finetune \
    --stage sft \
    --is-instruction-dataset \
    --no-pad-to-seq-lengths \
    --prompt-type deepseek3 \
"


python -m torch.distributed.launch $DISTRIBUTED_ARGS -m megatron_ascend.posttrain \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    $MLA_ARGS \
    $ROPE_ARGS \
    $MOE_ARGS \
    $FINETUNE_ARGS \
    $CKPT_ARGS \
    --distributed-backend nccl \
    --transformer-impl local \
    | tee tune_deepseek3_671b_4k_full_512_ptd.log
