# Pretraining, tiny DeepSeek-V3-style MoE on 2 CPU processes (minutes): the recipe every machine can run.
#
#   bash bench/reference/run.sh cpu-tiny                  # seed 1234, fp32, the planner's layout
#   SEED=4321 bash bench/reference/run.sh cpu-tiny        # second seed: with the first, the seed-noise band
#   PRECISION=bf16 bash bench/reference/run.sh cpu-tiny   # bf16 params/activations (fp32 main grads + Adam)
#   LAYOUT=tp2 bash bench/reference/run.sh cpu-tiny       # another layout: TP2 + sequence parallel
#
# Model: models/cpu-tiny.json -- MLA (q/kv LoRA 32, decoupled RoPE 8), 1 dense + 3 MoE layers (8 routed experts,
#   top-2 of 2 groups, sigmoid noaux_tc with the bias update, 1 shared), 1 MTP layer; hidden 64, vocab 512.
# Data: ma-synth v1 pretraining (make_data.py), seed 1, 3,000 documents, ids < 512: 1,610,428 tokens.
# Stop: a fixed number of tokens, 768,000 = 375 iterations x 16 sequences x 128 tokens. Reports measure the
#   time to loss 3.5 (smoothed over 10 iterations).
# Layout, from the planner (CPU figures given by hand: it has no CPU entry):
#   $ python tools/plan.py --model-config bench/reference/models/cpu-tiny.json --num-devices 2 --seq-length 128 \
#       --global-batch-size 16 --tflops 0.03 --hbm-gib 8 --hbm-tbps 0.02 --devices-per-node 2 \
#       --intra-node-gbps 2 --inter-node-gbps 2
#   TP1 PP1 EP1 DP2 distopt rc=none mbs1      6613 tok/s/dev   (best of 84 layouts, all fit; mbs2 ties)
#   $ python tools/plan.py ... (as above) --layout tp=1,pp=1,ep=1,distopt=1,mbs=8
#   TP1 PP1 EP1 DP2 distopt rc=none mbs8      6613 tok/s/dev   fits
# We run the mbs8 row: it ties the best (the planner does not count the fixed cost of a micro-batch, which
# dominates at this size on CPU: mbs1 ran ~4x slower per token here).
RECIPE_VERSION=1
RECIPE_STAGE=pretrain
RECIPE_MODEL=cpu-tiny
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=cpu
RECIPE_DEVICES=2
RECIPE_DEVICES_PER_NODE=2
RECIPE_SEED=1234
RECIPE_PRECISION=fp32
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1 \
    --use-distributed-optimizer --micro-batch-size 8"
RECIPE_LAYOUTS[tp2]="--tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 8"
RECIPE_LAYOUTS[pp2]="--pipeline-model-parallel-size 2 --micro-batch-size 4"
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
RECIPE_SAVE=1
