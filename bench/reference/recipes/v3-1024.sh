# Pretraining, full DeepSeek-V3 (671B / 37B active, + MTP) on 1,024 Ascend 910C devices (64 A3 nodes).
#
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0> bash bench/reference/run.sh v3-1024   (on every node)
#   DEVICE_TYPE=cuda DEVICES_PER_NODE=8 NNODES=128 ... (the same 1,024-device job on H800/H100 nodes)
#
# Model: models/v3.json (the released config, plain RoPE at 4K as in pre-training), random init.
# Data: ma-synth v1 pretraining, seed 1, 8,000,000 documents, ids < 32768 (~4.35B tokens, 8.7 GB).
# Stop: at loss 2.6 (mean of 20 iterations), at most 5,033,164,800 tokens = 300 iterations x 4096 x 4096.
#   Target from the language's entropy, not calibrated on hardware.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v3.json --device Ascend910C \
#       --num-devices 1024 --seq-length 4096 --global-batch-size 4096
#   TP8 PP8 EP16 DP16 SP distopt rc=selective mbs1 first/last=8/5   508 tok/s/dev 132 TFLOP/s  step 32.26 s |
#   56.5 GiB peak (best of 4596 layouts, 744 fit)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=v3
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=1024
RECIPE_DEVICES_PER_NODE=16
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 8 --sequence-parallel --pipeline-model-parallel-size 8 \
    --decoder-first-pipeline-num-layers 8 --decoder-last-pipeline-num-layers 5 --expert-model-parallel-size 16 \
    --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce --recompute-granularity selective \
    --recompute-modules layernorm mla_up_proj moe_act --micro-batch-size 1"
RECIPE_SEQ=4096
RECIPE_GBS=4096
RECIPE_TRAIN_TOKENS=5033164800
RECIPE_STOP=loss
RECIPE_EXIT_AT_LOSS=2.6
RECIPE_TARGET_LOSS=2.6
RECIPE_OPT_ARGS="--lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters 30 --lr-decay-style cosine --weight-decay 0.1 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=pretrain
RECIPE_DATA_DOCS=8000000
RECIPE_EVAL_INTERVAL=50
RECIPE_SAVE=0
RECIPE_SEED=1234
RECIPE_PRECISION=bf16
RECIPE_DATA_SEED=1
RECIPE_DATA_VOCAB=32768
RECIPE_SPLIT=999,1,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_ITERS=5
