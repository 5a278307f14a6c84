"""Monitoring: the training log line, TensorBoard scalars under Megatron's names, FLOPs / throughput / MFU,
memory and MoE load statistics.

Module map:
  flops        model_flops_per_token(config, seq_len): Megatron's formula extended to MLA, MoE, MTP, DSA, V4
  throughput   tokens/s, TFLOP/s per device, MFU against platform.peak_tflops (or a measured CPU matmul ceiling)
  memory       allocator figures (device) or RSS (CPU) as TensorBoard scalars and a short log string
  moe_stats    tokens-per-expert imbalance per MoE layer from moe.collect_load_stats
  tensorboard  TensorBoardWriter: `name` vs iteration and `name vs samples` vs consumed samples
  logger       TrainingLogger: accumulates losses between log intervals and prints Megatron's log line

Nothing here imports training/ or builds process groups; collectives are done by the caller.
"""
from .flops import flops_breakdown, model_flops_per_step, model_flops_per_token
from .logger import TrainingLogger
from .tensorboard import TensorBoardWriter
from .throughput import Throughput, measure_matmul_tflops

__all__ = ["flops_breakdown", "model_flops_per_step", "model_flops_per_token", "TrainingLogger",
           "TensorBoardWriter", "Throughput", "measure_matmul_tflops"]
