"""DeepSeek-V4: mHC residual streams (hyper_connection.py), the decoder layer (layer.py: attention + MoE between
stream mixings), MTP (mtp.py), the causal-LM chunk (model.py) and the HF name mapping (hf_names.py). The attention
(attention.py with compressor.py, indexer.py, core_attention.py) and its RoPE tables (rope.py) are one pluggable
part. docs/V4.md says what each part keeps per token and where we differ from transformers / DeepSeek."""
from .model import DeepseekV4ForCausalLM

__all__ = ["DeepseekV4ForCausalLM"]
