# SFT of the cpu-tiny model on 2 CPU processes (minutes): fine-tunes cpu-tiny's checkpoint on ma-synth tasks.
#
#   bash bench/reference/run.sh cpu-tiny                  # first: the pretraining run it loads
#   bash bench/reference/run.sh cpu-tiny-sft
#
# Model: models/cpu-tiny.json, loaded from reference_runs/cpu-tiny/plan-fp32-s1234/checkpoints (LOAD=... for
#   another); --finetune semantics (fresh optimizer and iteration count).
# Data: ma-synth v1 SFT (make_data.py sft), seed 1, 6,000 conversations [task, prompt, SEP, response, EOD] with
#   the loss on the response (copy / reverse / map the prompt), packed into 128-token samples.
# Stop: a fixed number of tokens, 307,200 = 150 iterations x 16 x 128 (packed positions). Reports measure the
#   time to loss 5.0 (reached after ~50 iterations in our run).
# Layout, from the planner (the same answer as for pretraining; mbs 8 as there):
#   $ python tools/plan.py --model-config bench/reference/models/cpu-tiny.json --num-devices 2 --seq-length 128 \
#       --global-batch-size 16 --tflops 0.03 --hbm-gib 8 --hbm-tbps 0.02 --devices-per-node 2 \
#       --intra-node-gbps 2 --inter-node-gbps 2 --layout tp=1,pp=1,ep=1,distopt=1,mbs=8
#   TP1 PP1 EP1 DP2 distopt rc=none mbs8      6613 tok/s/dev   fits
RECIPE_VERSION=1
RECIPE_STAGE=sft
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
RECIPE_SEQ=128
RECIPE_GBS=16
RECIPE_TRAIN_TOKENS=307200
RECIPE_STOP=tokens
RECIPE_TARGET_LOSS=5.0
RECIPE_OPT_ARGS="--lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=sft
RECIPE_DATA_SEED=1
RECIPE_DATA_DOCS=6000
RECIPE_DATA_VOCAB=512
RECIPE_SPLIT=98,2,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_INTERVAL=50
RECIPE_EVAL_ITERS=4
RECIPE_EXTRA_ARGS="--sft-packing"
RECIPE_LOAD=reference_runs/cpu-tiny/plan-fp32-s1234/checkpoints
RECIPE_LOAD_FROM="bash bench/reference/run.sh cpu-tiny"
RECIPE_SAVE=0
