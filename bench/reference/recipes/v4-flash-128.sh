# Pretraining, full DeepSeek-V4-Flash (284B / 13B active, + MTP) on 128 Ascend 910C devices (8 A3 nodes).
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash bench/reference/run.sh v4-flash-128
#
# The V4 model: models/deepseek_v4 (its CPU-size sibling, cpu-tiny-v4, is the one run here).
# Model: models/v4-flash.json (the released config: 43 layers, 2 sliding + 21 CSA + 20 HCA, mHC x4, 256 experts
#   top-6, 3 hash-routed layers, 1 MTP layer), random init.
# Data: ma-synth v1 pretraining, seed 1, 2,000,000 documents, ids < 32768 (~1.09B tokens).
# Stop: at loss 2.6 (mean of 20 iterations), at most 2,097,152,000 tokens = 500 iterations x 1024 x 4096.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v4-flash.json --device Ascend910C \
#       --num-devices 128 --seq-length 4096 --global-batch-size 1024
#   TP2 PP8 EP8 ETP2 DP8 SP distopt rc=full mbs1 first/last=6/1   1339 tok/s/dev 120 TFLOP/s  step 24.47 s |
#   55.2 GiB peak (best of 2736 layouts, 76 fit; planner with V4 activations as metered)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=v4-flash
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=128
RECIPE_DEVICES_PER_NODE=16
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 8 \
    --decoder-first-pipeline-num-layers 6 --decoder-last-pipeline-num-layers 1 --expert-model-parallel-size 8 \
    --expert-tensor-parallel-size 2 --use-distributed-optimizer --overlap-grad-reduce --recompute-granularity full \
    --recompute-method uniform --recompute-num-layers 1 --micro-batch-size 1"
RECIPE_SEQ=4096
RECIPE_GBS=1024
RECIPE_TRAIN_TOKENS=2097152000
RECIPE_STOP=loss
RECIPE_EXIT_AT_LOSS=2.6
RECIPE_TARGET_LOSS=2.6
RECIPE_OPT_ARGS="--lr 2.7e-4 --min-lr 2.7e-5 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.1 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=pretrain
RECIPE_DATA_DOCS=2000000
RECIPE_EVAL_INTERVAL=100
RECIPE_SAVE=0
RECIPE_SEED=1234
RECIPE_PRECISION=bf16
RECIPE_DATA_SEED=1
RECIPE_DATA_VOCAB=32768
RECIPE_SPLIT=999,1,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_ITERS=5
