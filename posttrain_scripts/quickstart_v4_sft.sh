#!/bin/bash
# Quickstart, DeepSeek-V4: full-parameter SFT of a tiny DeepSeek-V4 on 8 CPU processes, with held-out exact match.
#
#   bash posttrain_scripts/quickstart_v4_sft.sh          # a few minutes on 2 cores
#
# The model is DeepSeek-V4 in miniature, from a transformers-style config.json this script writes: mHC residual
# streams (4), sliding-window / CSA (compressor + lightning indexer, top-k) / HCA attention layers, sqrt-softplus
# MoE with two hash-routed layers (frozen tid2eid) and clamped SwiGLU, one MTP block. It trains at
# TP2 x PP2 x EP2 x DP2 with sequence parallel and the distributed optimizer (8 gloo processes, torchrun).
# There is no pretrained tiny V4, so the SFT starts from the random initialisation -- give V4_LOAD=<our
# checkpoint> (e.g. converted with tools/convert_ckpt.py from a HF V4 directory) to fine-tune one instead.
#
# Steps: (1) a task with checkable answers: copy QUICKSTART_SFT_LEN (4) letters ("Repeat: c a f b" -> "c a f b"),
# 3000 training / 200 disjoint held-out examples; (2) a small SentencePiece tokenizer trained on the training set
# (tools/train_tokenizer.py, chat tokens included); (3) tools/preprocess_data.py --sft with the DeepSeek chat
# template (loss on the answer tokens only); (4) `python -m megatron_ascend.posttrain` on the V4 config;
# (5) greedy held-out exact match of the saved checkpoint (python -m megatron_ascend.training.generate, one
# process: the checkpoint is resharded to TP1 PP1 on load).
#
# Knobs: QUICKSTART_V4_DIR (outputs, default ./quickstart_v4_run), QUICKSTART_V4_ITERS (200),
# QUICKSTART_EVAL_LIMIT (200), V4_LOAD, DEVICE_TYPE (cpu), GPUS_PER_NODE (8), MASTER_PORT.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python}
OUT=${QUICKSTART_V4_DIR:-$REPO/quickstart_v4_run}
ITERS=${QUICKSTART_V4_ITERS:-200}
EVAL_LIMIT=${QUICKSTART_EVAL_LIMIT:-200}
DEVICE_TYPE=${DEVICE_TYPE:-cpu}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + RANDOM % 20000 ))}
export MEGATRON_ASCEND_DEVICE=$DEVICE_TYPE
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

# ---- 1. instruction data with checkable answers -----------------------------------------------------------------
SFT=$OUT/sft
mkdir -p "$SFT"
$PYTHON - "$SFT" <<'EOF'
import json, os, random, string, sys
out = sys.argv[1]
rng = random.Random(0)
n = int(os.environ.get("QUICKSTART_SFT_LEN", "4"))
seen, rows = set(), []
while len(rows) < 3200:
    letters = tuple(rng.choice(string.ascii_lowercase[:12]) for _ in range(n))
    if letters not in seen:
        seen.add(letters)
        rows.append({"instruction": "Repeat: " + " ".join(letters), "output": " ".join(letters)})
for name, part in (("train", rows[:3000]), ("test", rows[3000:])):
    with open(os.path.join(out, f"copy_{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
print(f"[v4 sft] task 'copy': {out}/copy_train.jsonl (3000), {out}/copy_test.jsonl (200, disjoint)")
EOF

# ---- 2. tokenizer + 3. preprocessing ------------------------------------------------------------------------------
TOKENIZER=$OUT/tokenizer/copy_sp
if [ ! -s "$TOKENIZER.model" ]; then
  mkdir -p "$OUT/tokenizer"
  $PYTHON tools/train_tokenizer.py --input "$SFT/copy_train.jsonl" --json-keys instruction output \
      --model-prefix "$TOKENIZER" --vocab-size 320 --num-threads 2 >/dev/null
fi
$PYTHON tools/preprocess_data.py --sft --input "$SFT/copy_train.jsonl" --output-prefix "$SFT/copy" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model" --prompt-type deepseek --no-progress

# ---- 4. the tiny DeepSeek-V4 (transformers' DeepseekV4Config keys) and its SFT -----------------------------------
CONFIG=$OUT/config.json
$PYTHON - "$CONFIG" <<'EOF'
import json, sys
csa, hca = "compressed_sparse_attention", "heavily_compressed_attention"
cfg = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 320,
    "hidden_size": 64, "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 16, "q_lora_rank": 32, "o_groups": 2,
    "o_lora_rank": 32, "sliding_window": 16, "layer_types": ["sliding_attention", csa, hca, csa],
    "compress_rates": {csa: 4, hca: 8}, "index_n_heads": 2, "index_head_dim": 32, "index_topk": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"],
    "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "initializer_range": 0.02,
}
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
print(f"[v4 sft] model: {sys.argv[1]} (4 layers: sliding / CSA / HCA / CSA, 8 experts, 2 hash layers, mHC x4, MTP 1)")
EOF
CKPT_SAVE_DIR=$OUT/checkpoints
TB_DIR=$OUT/tensorboard
rm -rf "$CKPT_SAVE_DIR" "$TB_DIR"
LOAD_ARGS=""
if [ -n "${V4_LOAD:-}" ]; then LOAD_ARGS="--load $V4_LOAD"; fi
MODEL_ARGS="--model-config $CONFIG --init-method-std 0.02 --mtp-loss-scaling-factor 0.3 --moe-aux-loss-coeff 1e-4 \
    --moe-router-bias-update-rate 1e-3"
PARALLEL_ARGS="--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2 \
    --sequence-parallel --use-distributed-optimizer"
TRAIN_ARGS="--stage sft $LOAD_ARGS --seq-length 32 --micro-batch-size 8 --global-batch-size 32 --train-iters $ITERS \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( ITERS / 20 > 0 ? ITERS / 20 : 1 )) --lr-decay-style cosine \
    --weight-decay 0.01 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.99 --seed 1234"
DATA_ARGS="--data-path $SFT/copy --split 95,5,0 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model $TOKENIZER.model --prompt-type deepseek"
OUTPUT_ARGS="--log-interval 10 --eval-interval $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )) --eval-iters 2 \
    --save $CKPT_SAVE_DIR --save-interval $ITERS --tensorboard-dir $TB_DIR"
echo "[v4 sft] fine-tuning $ITERS iterations on $GPUS_PER_NODE processes ($DEVICE_TYPE) ..."
# shellcheck disable=SC2086
torchrun --nproc_per_node "$GPUS_PER_NODE" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
    -m megatron_ascend.posttrain $MODEL_ARGS $PARALLEL_ARGS $TRAIN_ARGS $DATA_ARGS $OUTPUT_ARGS 2>&1 \
    | grep --line-buffered -v "^W[0-9]\{4\}\|^\*\*\*\*\|OMP_NUM_THREADS" | tee "$OUT/sft.log"

# ---- 5. held-out exact match -----------------------------------------------------------------------------------------
$PYTHON -m megatron_ascend.training.generate --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER.model" \
    --eval-data "$SFT/copy_test.jsonl" --prompt-type deepseek --max-new-tokens 12 --limit "$EVAL_LIMIT" \
    --load "$CKPT_SAVE_DIR" --label "after V4 SFT" --output "$SFT/accuracy_after.json"
$PYTHON - "$SFT" <<'EOF'
import json, os, sys
a = json.load(open(os.path.join(sys.argv[1], "accuracy_after.json")))
print(f"[v4 sft] held-out exact match after SFT: {a['correct']}/{a['total']} = {a['accuracy']:.3f}")
EOF
echo "[v4 sft] checkpoint: $CKPT_SAVE_DIR   TensorBoard: $TB_DIR"
