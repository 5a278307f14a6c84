# SFT (full-parameter post-training) of full DeepSeek-V4-Pro (1.6T / 49B active) on 1,024 Ascend 910C devices.
#
#   V4_PRO_HF=/data/DeepSeek-V4-Pro NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0> \
#       bash bench/reference/run.sh v4-pro-1024-sft                        (on every node)
#
# The workload of the claim this project started from. Loading the released weights needs the V4 checkpoint
# reader (issue 15's conversion part) on main; SHOW_LAYOUT=1 / DRY_RUN=1 check the job without devices.
# Model: models/v4-pro.json (the released config: 61 layers, 30 CSA + 31 HCA, mHC x4, 384 experts top-6, 3 hash
#   layers, 1 MTP layer), loaded from the released HuggingFace checkpoint ($V4_PRO_HF, converted once at start
#   by --enable-hf2mg-convert; FP8 / FP4 weights dequantised to bf16).
# Data: ma-synth v1 SFT, seed 1, 100,000 conversations with prompts of 1000-4000 words (one conversation of
#   2,000-8,000 tokens per 8192-token sample: V4 refuses packed samples), ids < 32768 (~500M tokens).
# Stop: a fixed number of tokens, 419,430,400 = 100 iterations x 512 x 8192. Reports measure the time to 0.5.
# Layout, from the planner (its preset v4pro-1024-910c asks the same question):
#   $ python tools/plan.py --model-config bench/reference/models/v4-pro.json --device Ascend910C \
#       --num-devices 1024 --seq-length 8192 --global-batch-size 512
#   TP16 PP1 EP64 ETP16 DP64 SP distopt rc=full mbs1   276 tok/s/dev 90 TFLOP/s  step 14.84 s | 55.9 GiB peak
#   (best of 4140 layouts, 117 fit; planner with V4 activations as metered)
RECIPE_VERSION=1
RECIPE_STAGE=sft
RECIPE_MODEL=v4-pro
RECIPE_MODEL_ARGS=""
RECIPE_DEVICE_TYPE=npu
RECIPE_DEVICES=1024
RECIPE_DEVICES_PER_NODE=16
RECIPE_LAYOUTS[plan]="--tensor-model-parallel-size 16 --sequence-parallel --pipeline-model-parallel-size 1 \
    --expert-model-parallel-size 64 --expert-tensor-parallel-size 16 --use-distributed-optimizer --overlap-grad-reduce \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 --micro-batch-size 1"
RECIPE_SEQ=8192
RECIPE_GBS=512
RECIPE_TRAIN_TOKENS=419430400
RECIPE_STOP=tokens
RECIPE_TARGET_LOSS=0.5
RECIPE_OPT_ARGS="--lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 5 --lr-decay-style cosine --weight-decay 0.0 \
    --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95"
RECIPE_DATA_KIND=sft
RECIPE_DATA_DOCS=100000
RECIPE_DATA_ARGS="--min-prompt 1000 --max-prompt 4000"
RECIPE_DATA_TAG=p1000-4000
RECIPE_EVAL_INTERVAL=25
RECIPE_EXTRA_ARGS="--enable-hf2mg-convert"
RECIPE_LOAD=${V4_PRO_HF:-/data/DeepSeek-V4-Pro}
RECIPE_LOAD_FROM="the released checkpoint: huggingface-cli download deepseek-ai/DeepSeek-V4-Pro --local-dir \$V4_PRO_HF"
RECIPE_SAVE=0
RECIPE_SEED=1234
RECIPE_PRECISION=bf16
RECIPE_DATA_SEED=1
RECIPE_DATA_VOCAB=32768
RECIPE_SPLIT=999,1,0
RECIPE_LOG_INTERVAL=5
RECIPE_EVAL_ITERS=5
