# Pretraining, tiny DeepSeek-V4-style model on 2 CPU processes (minutes): the V4 recipe every machine can run.
#
#   bash bench/reference/run.sh cpu-tiny-v4              # the V4 model: models/deepseek_v4
#
# Model: models/cpu-tiny-v4.json -- V4's parts in miniature: mHC (4 streams, Sinkhorn), shared-KV attention with a
#   16-token sliding window, compressed sparse attention (ratio 4, indexer top-8) and heavily compressed
#   attention (ratio 16) over 4 layers (sliding, CSA, HCA, CSA) + a sliding MTP layer, grouped output
#   projection, 8 routed experts top-2 with sqrt(softplus) scores and the bias update, the first layer
#   hash-routed, clamped SwiGLU; hidden 64, vocab 512.
# Data: ma-synth v1 pretraining, seed 1, 3,000 documents, ids < 512 (the cpu-tiny recipe's data).
# Stop: a fixed number of tokens, 768,000 = 375 iterations x 16 x 128. Reports measure the time to loss 3.5.
# Layout, from the planner (CPU figures given by hand):
#   $ python tools/plan.py --model-config bench/reference/models/cpu-tiny-v4.json --num-devices 2 \
#       --seq-length 128 --global-batch-size 16 --tflops 0.03 --hbm-gib 8 --hbm-tbps 0.02 --devices-per-node 2 \
#       --intra-node-gbps 2 --inter-node-gbps 2
#   TP1 PP1 EP1 DP2 distopt rc=none mbs1      5553 tok/s/dev   (best of 84 layouts, all fit; mbs 2 ties)
#   $ ... --layout tp=1,pp=1,ep=1,distopt=1,mbs=8
#   TP1 PP1 EP1 DP2 distopt rc=none mbs8      5553 tok/s/dev   fits   (run: ties the best, fewer micro-batches)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=cpu-tiny-v4
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=cpu
RECIPE_DEVICES=2
RECIPE_DEVICES_PER_NODE=2
RECIPE_SEED=1234
RECIPE_PRECISION=fp32
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1 \
    --use-distributed-optimizer --micro-batch-size 8"
RECIPE_LAYOUTS[tp2]="--tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 8"
RECIPE_LAYOUTS[ep2]="--expert-model-parallel-size 2 --use-distributed-optimizer --micro-batch-size 8"
RECIPE_SEQ=128
RECIPE_GBS=16
RECIPE_TRAIN_TOKENS=768000
RECIPE_STOP=tokens
RECIPE_TARGET_LOSS=3.5
RECIPE_OPT_ARGS="--lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 15 --lr-decay-style cosine --weight-decay 0.1 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=pretrain
RECIPE_DATA_SEED=1
RECIPE_DATA_DOCS=3000
RECIPE_DATA_VOCAB=512
RECIPE_SPLIT=98,2,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_INTERVAL=75
RECIPE_EVAL_ITERS=4
RECIPE_SAVE=0
