"""Loss scalers for fp16 training (bf16 and fp32 need none).

``DynamicGradScaler`` follows Megatron's rules: on a step with inf/nan grads the hysteresis counter drops
and, once it reaches zero, the scale is multiplied by ``backoff_factor`` (never below ``min_scale``); after
``growth_interval`` clean steps in a row the scale is multiplied by ``growth_factor`` and the hysteresis is
refilled. The scale is a Python float: the inf check that feeds ``update`` is a host sync anyway.
"""
from __future__ import annotations

from typing import Dict


class ConstantGradScaler:
    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> Dict:
        return {"scale": self.scale}

    def load_state_dict(self, sd: Dict) -> None:
        self.scale = float(sd["scale"])


class DynamicGradScaler:
    def __init__(self, initial_scale: float, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        if not initial_scale > 0 or not min_scale > 0 or min_scale > initial_scale:
            raise ValueError(f"loss scale: need 0 < min_scale ({min_scale}) <= initial_scale ({initial_scale}); "
                             f"fix --initial-loss-scale / --min-loss-scale")
        if not growth_factor > 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"loss scale: growth_factor {growth_factor} must be > 1 and backoff_factor "
                             f"{backoff_factor} in (0, 1)")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"--loss-scale-window {growth_interval} and --hysteresis {hysteresis} must be >= 1")
        self.scale = float(initial_scale)
        self.min_scale, self.growth_factor, self.backoff_factor = float(min_scale), growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self) -> Dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, sd: Dict) -> None:
        self.scale = float(sd["scale"])
        self._growth_tracker = int(sd["growth_tracker"])
        self._hysteresis_tracker = int(sd["hysteresis_tracker"])
