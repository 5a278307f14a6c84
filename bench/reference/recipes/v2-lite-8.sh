# Pretraining, full DeepSeek-V2-Lite (15.7B / 2.4B active) on 8 devices (one Atlas 800T A2 node or 8 GPUs).
#
#   bash bench/reference/run.sh v2-lite-8                   # Ascend (DEVICE_TYPE=npu, the default)
#   DEVICE_TYPE=cuda bash bench/reference/run.sh v2-lite-8  # the same recipe on 8 NVIDIA GPUs
#
# Model: models/v2-lite.json (the released config: MLA without q-LoRA, 1 dense + 26 MoE layers of 64 experts
#   top-6 softmax greedy, 2 shared, YaRN x40), random init (seed), bf16 with fp32 main grads and Adam.
# Data: ma-synth v1 pretraining, seed 1, 2,000,000 documents, ids < 32768 (~1.09B tokens, 2.2 GB).
# Stop: at loss 2.6 (mean lm loss of 20 iterations; the language's Markov part alone is 2.36 nats/token), at
#   most 2,097,152,000 tokens = 2000 iterations x 256 x 4096. The target was set from the language's
#   entropy, not calibrated on hardware: recalibrate (and bump RECIPE_VERSION) after the first published run.
# Layout, from the planner:
#   $ python tools/plan.py --model-config bench/reference/models/v2-lite.json --device Ascend910B2 \
#       --num-devices 8 --seq-length 4096 --global-batch-size 256
#   TP1 PP1 EP8 DP8 distopt rc=selective mbs1   9528 tok/s/dev 156 TFLOP/s  step 13.76 s | 56.7 GiB peak
#   (best of 480 layouts, 193 fit; selective = layernorm + mla_up_proj + moe_act)
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
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
RECIPE_LAYOUTS[tp2]="--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 \
    --expert-tensor-parallel-size 2 --use-distributed-optimizer --overlap-grad-reduce --recompute-granularity selective \
    --recompute-modules layernorm mla_up_proj moe_act --micro-batch-size 1"
RECIPE_SEQ=4096
RECIPE_GBS=256
RECIPE_TRAIN_TOKENS=2097152000
RECIPE_STOP=loss
RECIPE_EXIT_AT_LOSS=2.6
RECIPE_TARGET_LOSS=2.6
RECIPE_OPT_ARGS="--lr 4.2e-4 --min-lr 4.2e-5 --lr-warmup-iters 100 --lr-decay-style cosine --weight-decay 0.1 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=pretrain
RECIPE_DATA_SEED=1
RECIPE_DATA_DOCS=2000000
RECIPE_DATA_VOCAB=32768
RECIPE_SPLIT=999,1,0
RECIPE_LOG_INTERVAL=10
RECIPE_EVAL_INTERVAL=200
RECIPE_EVAL_ITERS=10
RECIPE_SAVE=1
