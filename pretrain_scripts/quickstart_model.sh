# Sourced by pretrain_scripts/quickstart.sh and posttrain_scripts/quickstart_sft.sh: the launcher settings and
# the one tiny DeepSeek-V3-style architecture + layout both use (the SFT run loads the pretraining checkpoint,
# so the two must not drift apart).
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + RANDOM % 20000 ))}

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

# DeepSeek-V3 in miniature: MLA (q/kv latents, decoupled RoPE), DeepSeekMoE (first layer dense), MTP depth 1
MODEL_ARGS="--model-type deepseek_v3 --num-layers 4 --hidden-size 64 --ffn-hidden-size 128 \
    --num-attention-heads 4 --q-lora-rank 32 --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 \
    --v-head-dim 16 --num-experts 8 --moe-ffn-hidden-size 64 --n-shared-experts 1 --moe-router-topk 2 \
    --moe-router-num-groups 2 --moe-router-group-topk 1 --moe-router-score-function sigmoid \
    --moe-router-topk-method noaux_tc --moe-router-topk-scaling-factor 2.5 --first-k-dense-replace 1 \
    --moe-aux-loss-coeff 1e-4 --moe-router-bias-update-rate 1e-3 --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 \
    --max-position-embeddings 256 --init-method-std 0.02"
# 8 processes: TP2 x PP2 x DP2, EP2 carved from the 4 ranks of each stage (expert-tp = tp)
PARALLEL_ARGS="--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2 \
    --use-distributed-optimizer"
