# Pretraining, DeepSeek-V4-Flash proxy (V4-Flash's layer shapes, 12 of its 43 layers, + MTP) on 64 devices.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash bench/reference/run.sh v4-flash-proxy-64
#
# The V4 model: models/deepseek_v4 (mHC, hybrid sliding / CSA / HCA attention, hash routing); its CPU-size
# sibling, cpu-tiny-v4, is the one run here.
# Model: models/v4-flash-proxy-64.json = models/v4-flash.json with num_hidden_layers 12 (compress ratios
#   0,0,4,128,... of the first 12 layers + the MTP layer's 0; 256 experts top-6 sqrtsoftplus, 3 hash layers).
# Data: ma-synth v1 pretraining, seed 1, 2,000,000 documents, ids < 32768 (~1.09B tokens).
# Stop: at loss 2.6 (mean of 20 iterations), at most 2,097,152,000 tokens = 500 iterations x 1024 x 4096.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v4-flash-proxy-64.json --device Ascend910B2 \
#       --num-devices 64 --seq-length 4096 --global-batch-size 1024
#   TP4 PP4 VP2 EP8 DP4 SP distopt rc=selective mbs1 first/last=4/0   4472 tok/s/dev 138 TFLOP/s
#   step 14.66 s | 55.7 GiB peak (2nd of 2340 layouts, 527 fit, with V4 activations as metered; the 1st,
#   TP8 EP1 ETP8 DP2 rc=none at 4531 tok/s/dev and 58.3 GiB, is 1.3 % faster: within the model's error)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=v4-flash-proxy-64
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=64
RECIPE_DEVICES_PER_NODE=8
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 4 --sequence-parallel --pipeline-model-parallel-size 4 \
    --virtual-pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 4 --decoder-last-pipeline-num-layers 0 \
    --expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce \
    --recompute-granularity selective --recompute-modules layernorm mla_up_proj moe_act --micro-batch-size 1"
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
