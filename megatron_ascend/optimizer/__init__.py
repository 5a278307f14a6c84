"""Optimizer: fp32 main params, Adam(W) / SGD, the distributed optimizer (ZeRO-1 over dp / expert-dp),
global grad-norm clipping, fp16 loss scaling, LR schedules, model-state memory accounting."""
from .clip_grads import clip_grads_, count_zeros, counts_in_grad_norm, global_grad_norm
from .grad_scaler import ConstantGradScaler, DynamicGradScaler
from .lr_scheduler import WSD_DECAY_STYLES, OptimizerParamScheduler
from .memory import analytic_model_state_bytes, model_state_bytes
from .optimizer import MegatronOptimizer, build_optimizer

__all__ = ["build_optimizer", "MegatronOptimizer", "OptimizerParamScheduler", "WSD_DECAY_STYLES",
           "DynamicGradScaler", "ConstantGradScaler", "global_grad_norm", "clip_grads_", "count_zeros",
           "counts_in_grad_norm", "model_state_bytes", "analytic_model_state_bytes"]
