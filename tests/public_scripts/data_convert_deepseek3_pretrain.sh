#!/bin/bash
# Shrunk copy of Ascend/MindSpeed-LLM:examples/mcore/deepseek3/data_convert_deepseek3_pretrain.sh @ c77308a14bfcb1aa7ca61da9c1aa24a893cb1b91
# (copyright its authors; BSD-style licence of that repository). Pretraining data (GeneralPretrainHandler).
# Changed: the entry point (marked 'entry point'), sizes and paths (numbers / placeholder paths, all
# flags kept). Run by tests/test_public_scripts.py in a scratch directory holding ./logs, the tiny data
# and ./model_from_hf/deepseek3-hf (a tiny HF tokenizer + DeepSeek-V3 checkpoint).
# entry point: ./preprocess_data.py -> $MEGATRON_ASCEND_DIR/tools/preprocess_data.py (no size to shrink)
# 请按照您的真实环境修改 set_env.sh 路径
source /usr/local/Ascend/ascend-toolkit/set_env.sh
mkdir ./dataset

python "$MEGATRON_ASCEND_DIR"/tools/preprocess_data.py \
    --input ./dataset/train-00000-of-00042-d964455e17e96d5a.parquet \
    --tokenizer-name-or-path ./model_from_hf/deepseek3-hf/ \
    --tokenizer-type PretrainedFromHF \
    --handler-name GeneralPretrainHandler \
    --output-prefix ./dataset/enwiki \
    --json-keys text \
    --workers 4 \
    --log-interval 1000 \
    --append-eod
