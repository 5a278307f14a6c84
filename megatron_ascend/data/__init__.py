"""Data pipeline: tokenizers, Megatron-compatible indexed datasets, GPT pretraining and SFT datasets,
blending, and the data-parallel sampler.

Module map (each module's docstring says what it owns):
  errors            DataError
  tokenizer         build_tokenizer: SentencePieceTokenizer, HuggingFaceTokenizer (tokenizer.json + chat template)
  chat_templates    named chat templates ('deepseek') and the jinja renderer used for a tokenizer's own template
  tokenizer_training  train a SentencePiece model / a tiny HF BPE (tools/train_tokenizer.py, tests)
  indexed_dataset   the .bin/.idx format (Megatron MMIDIDX v1): IndexedDataset reader, IndexedDatasetBuilder
  index_cache       hashed, atomic .npy caches of dataset indices next to the data
  gpt_dataset       GPTDataset (document / sample / shuffle indices), splits, build_train_valid_test_datasets
  blended_dataset   BlendedDataset and the --data-path "w1 p1 w2 p2" parser
  sft_format        JSONL records (alpaca / sharegpt / messages) -> role/content messages
  sft_dataset       SFTDataset: loss mask on assistant tokens, optional packing with segment ids
  masks             block-diagonal causal attention mask from segment ids (for models and tests)
  sampler           PretrainingSampler (dp slices, exact resume) and build_data_iterator
  preprocess        the engine behind tools/preprocess_data.py

Nothing here imports torch.distributed state at import time; nothing imports training/.
"""
