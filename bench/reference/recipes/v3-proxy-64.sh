# Pretraining, DeepSeek-V3 proxy (V3's layer shapes, 16 of its 61 layers, + MTP) filling 64 devices (8 nodes).
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash bench/reference/run.sh v3-proxy-64   (on every node)
#
# Model: models/v3-proxy-64.json = models/v3.json with num_hidden_layers 16 (3 dense + 13 MoE of 256 experts
#   top-8 sigmoid noaux_tc, 8 groups / 4, 1 shared; MLA q 1536 / kv 512; 1 MTP layer): ~151B parameters.
# Data: ma-synth v1 pretraining, seed 1, 2,000,000 documents, ids < 32768 (~1.09B tokens).
# Stop: at loss 2.6 (mean of 20 iterations), at most 2,097,152,000 tokens = 500 iterations x 1024 x 4096.
#   Target from the language's entropy, not calibrated on hardware.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v3-proxy-64.json --device Ascend910B2 \
#       --num-devices 64 --seq-length 4096 --global-batch-size 1024
#   TP8 PP1 EP64 DP8 SP distopt rc=none mbs1   1355 tok/s/dev 108 TFLOP/s  step 48.38 s | 59.6 GiB peak
#   (best of 2748 layouts, 7 fit)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=v3-proxy-64
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=64
RECIPE_DEVICES_PER_NODE=8
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 8 --sequence-parallel --pipeline-model-parallel-size 1 \
    --expert-model-parallel-size 64 --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce \
    --micro-batch-size 1"
RECIPE_SEQ=4096
RECIPE_GBS=1024
RECIPE_TRAIN_TOKENS=2097152000
RECIPE_STOP=loss
RECIPE_EXIT_AT_LOSS=2.6
RECIPE_TARGET_LOSS=2.6
RECIPE_OPT_ARGS="--lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.1 \
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
