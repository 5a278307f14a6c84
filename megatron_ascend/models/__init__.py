"""Model families: ``deepseek`` (V2 / V3 / V3.2), ``deepseek_v4``, on the shared pipeline-chunk skeleton
(``chunk.py``), built by ``model_type`` through ``registry.build_model``."""
from .registry import build_model, model_class, model_types

__all__ = ["build_model", "model_class", "model_types"]
