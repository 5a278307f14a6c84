# SFT of full DeepSeek-V2-Lite on 8 devices, from v2-lite-8's checkpoint, on the ma-synth SFT tasks.
#
#   bash bench/reference/run.sh v2-lite-8 && bash bench/reference/run.sh v2-lite-8-sft
#
# Model: models/v2-lite.json loaded from reference_runs/v2-lite-8/plan-bf16-s1234/checkpoints (LOAD=... for
#   another, e.g. a converted HuggingFace checkpoint), --finetune semantics.
# Data: ma-synth v1 SFT, seed 1, 1,000,000 conversations (~50M tokens), ids < 32768, packed into 4096 tokens.
# Stop: a fixed number of tokens, 52,428,800 = 200 iterations x 64 x 4096. Reports measure the time to loss 0.5.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v2-lite.json --device Ascend910B2 \
#       --num-devices 8 --seq-length 4096 --global-batch-size 64
#   TP1 PP1 EP8 DP8 distopt rc=selective mbs1   9447 tok/s/dev 155 TFLOP/s  step 3.47 s | 56.7 GiB peak
RECIPE_VERSION=1
RECIPE_STAGE=sft
RECIPE_MODEL=v2-lite
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=8
RECIPE_DEVICES_PER_NODE=8
RECIPE_SEED=1234
RECIPE_PRECISION=bf16
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 8 \
    --expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce --recompute-granularity selective \
    --recompute-modules layernorm mla_up_proj moe_act --micro-batch-size 1"
RECIPE_SEQ=4096
RECIPE_GBS=64
RECIPE_TRAIN_TOKENS=52428800
RECIPE_STOP=tokens
RECIPE_TARGET_LOSS=0.5
RECIPE_OPT_ARGS="--lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=sft
RECIPE_DATA_SEED=1
RECIPE_DATA_DOCS=1000000
RECIPE_DATA_VOCAB=32768
RECIPE_SPLIT=999,1,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_INTERVAL=50
RECIPE_EVAL_ITERS=10
RECIPE_EXTRA_ARGS="--sft-packing"
RECIPE_LOAD=reference_runs/v2-lite-8/plan-bf16-s1234/checkpoints
RECIPE_LOAD_FROM="bash bench/reference/run.sh v2-lite-8"
RECIPE_SAVE=0
