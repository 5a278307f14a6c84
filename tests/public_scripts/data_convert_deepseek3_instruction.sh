#!/bin/bash
# Shrunk copy of Ascend/MindSpeed-LLM:examples/mcore/deepseek3/data_convert_deepseek3_instruction.sh @ c77308a14bfcb1aa7ca61da9c1aa24a893cb1b91
# (copyright its authors; BSD-style licence of that repository). Alpaca instruction data (AlpacaStyleInstructionHandler).
# Changed: the entry point (marked 'entry point'), sizes and paths (numbers / placeholder paths, all
# flags kept). Run by tests/test_public_scripts.py in a scratch directory holding ./logs, the tiny data
# and ./model_from_hf/deepseek3-hf (a tiny HF tokenizer + DeepSeek-V3 checkpoint).
# entry point: ./preprocess_data.py -> $MEGATRON_ASCEND_DIR/tools/preprocess_data.py (no size to shrink)
# 请按照您的真实环境修改 set_env.sh 路径
# source /usr/local/Ascend/ascend-toolkit/set_env.sh
mkdir ./finetune_dataset

python "$MEGATRON_ASCEND_DIR"/tools/preprocess_data.py \
    --input ./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet \
    --tokenizer-name-or-path ./model_from_hf/deepseek3-hf \
    --output-prefix ./finetune_dataset/alpaca \
    --handler-name AlpacaStyleInstructionHandler \
    --tokenizer-type PretrainedFromHF \
    --workers 4 \
    --log-interval 1000 \
    --overwrite-cache \
    --prompt-type deepseek3
