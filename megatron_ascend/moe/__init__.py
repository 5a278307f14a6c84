"""DeepSeekMoE with expert parallelism: router, load balancing, token dispatchers, grouped experts, MoELayer.

Public interface (ARCHITECTURE.md): ``MoELayer(model_cfg, par_cfg, groups, layer_idx)``,
``update_expert_bias(model, groups, rate)``, ``collect_load_stats(model, groups=None)``,
``set_aux_loss_scale(scale)``. Design notes: docs/MOE.md.
"""
from .load_balancing import (MoEAuxLossAutoScaler, collect_load_stats, set_aux_loss_scale,  # noqa: F401
                             update_expert_bias)
from .moe_layer import MoELayer  # noqa: F401
from .router import TopKRouter  # noqa: F401
