"""DeepSeek V2 / V2-Lite / V3 / V3.2 models: MLA (+ DSA indexer), dense MLP / MoE block slot, decoder layer,
MTP, the causal-LM chunk for any TP/SP/PP/EP layout, and HF interop."""
from .model import DeepseekForCausalLM, segment_mask
from .layer import DecoderLayer
from .attention import MLAttention
from .mlp import DenseMLP
from .norm import RMSNorm
from .hf import load_hf_state_dict_into, model_config_for_hf

__all__ = ["DeepseekForCausalLM", "DecoderLayer", "MLAttention", "DenseMLP", "RMSNorm", "segment_mask",
           "load_hf_state_dict_into", "model_config_for_hf"]
