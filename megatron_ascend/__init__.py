"""megatron_ascend: Megatron-style TP/SP/PP/EP/DP training of DeepSeek-family MoE models on Ascend NPUs,
CUDA GPUs and CPU. See docs/ARCHITECTURE.md for the layers and the direction of imports."""

__version__ = "0.1.0"
