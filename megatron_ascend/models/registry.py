"""Models by ``model_type``: the one place that knows which class builds which DeepSeek generation.

    model = build_model(cfg, par, groups, pre_process=..., post_process=..., layer_ids=..., include_mtp=...,
                        padded_vocab_size=..., init_seed=...)
    cls = model_class(cfg)          # e.g. to build on the meta device without initialising

Every class takes the same constructor and returns the same forward outputs (models/chunk.py). Classes are
imported when first asked for, so importing the registry stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Union

from ..config import ConfigError, ModelConfig

_CLASSES = {
    "deepseek_v2": ("megatron_ascend.models.deepseek.model", "DeepseekForCausalLM"),
    "deepseek_v3": ("megatron_ascend.models.deepseek.model", "DeepseekForCausalLM"),
    "deepseek_v32": ("megatron_ascend.models.deepseek.model", "DeepseekForCausalLM"),
    "deepseek_v4": ("megatron_ascend.models.deepseek_v4.model", "DeepseekV4ForCausalLM"),
}


def model_types():
    return tuple(_CLASSES)


def model_class(cfg: Union[ModelConfig, str]):
    model_type = cfg if isinstance(cfg, str) else cfg.model_type
    if model_type not in _CLASSES:
        raise ConfigError(f"model_type {model_type!r} has no model class; use one of {', '.join(_CLASSES)}")
    module, name = _CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig, parallel=None, groups=None, **kwargs):
    """``model_class(cfg)(cfg, parallel, groups, **kwargs)``."""
    return model_class(cfg)(cfg, parallel, groups, **kwargs)
