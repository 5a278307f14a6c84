"""Learning-rate schedules (Megatron's OptimizerParamScheduler, iteration based).

lr(n) for step count n (0 before the first ``step``):

* warm-up, n <= warmup (warmup > 0): lr = init + (max_lr - init) * n / warmup, init = --lr-warmup-init
  (default 0, so the first update uses lr 0, as Megatron);
* n > decay_iters: lr = min_lr (decay_iters = --lr-decay-iters, default train_iters);
* otherwise coeff by --lr-decay-style, lr = min_lr + coeff * (max_lr - min_lr), with
  r = (n - warmup) / (decay_iters - warmup):
  constant: lr = max_lr; linear: coeff = 1 - r; cosine: coeff = (cos(pi r) + 1) / 2;
  WSD (warm-up, stable, decay): coeff = 1 until decay_iters - wsd_decay_iters, then, with
  q = (n - (decay_iters - wsd_decay_iters)) / wsd_decay_iters, --lr-wsd-decay-style linear: 1 - q,
  cosine: (cos(pi q) + 1) / 2, exponential: 2 * 0.5 ** q - 1, minus_sqrt: 1 - sqrt(q).

Warm-up and decay lengths may be fractional: a schedule given in samples (--train-samples with
--lr-warmup-samples / --lr-decay-samples) is this one with the lengths divided by the global batch size, which
at a constant batch is Megatron's sample-counted schedule. The trainer calls ``step(1)`` after each successful
optimizer step. ``state_dict`` holds the step count and the settings; ``load_state_dict`` restores the step
count and keeps the current run's settings, or takes the checkpoint's with ``use_checkpoint_settings``.
``settings_diff`` lists what differs: the checkpoint package refuses a difference unless
--override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler decides.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


def _whole(x):
    """An int when the length is whole (iteration-based flags, checkpoints as before), else the float."""
    x = float(x)
    return int(x) if x.is_integer() else x


class OptimizerParamScheduler:
    def __init__(self, optimizer, opt_cfg, train_iters: Optional[int], lr_decay_iters: Optional[int] = None):
        """``lr_decay_iters`` (optional) overrides opt_cfg.lr_decay_iters; both default to train_iters."""
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(opt_cfg.lr), float(opt_cfg.min_lr)
        self.decay_style = opt_cfg.lr_decay_style
        self.warmup_steps = _whole(opt_cfg.lr_warmup_iters)
        self.warmup_init = float(getattr(opt_cfg, "lr_warmup_init", 0.0) or 0.0)
        decay = lr_decay_iters if lr_decay_iters is not None else opt_cfg.lr_decay_iters
        decay = decay if decay is not None else train_iters
        if self.decay_style != "constant":
            if decay is None or decay <= 0:
                raise ValueError(f"--lr-decay-style {self.decay_style} needs --lr-decay-iters or --train-iters > 0 "
                                 f"(got lr_decay_iters={opt_cfg.lr_decay_iters}, train_iters={train_iters})")
            if decay <= self.warmup_steps:
                raise ValueError(f"--lr-decay-iters {decay} must exceed --lr-warmup-iters {self.warmup_steps}; "
                                 f"lower the warm-up or raise the decay iterations")
        self.decay_steps = _whole(decay) if decay is not None else 0
        self.wsd_decay_steps = opt_cfg.lr_wsd_decay_iters
        self.wsd_decay_style = opt_cfg.lr_wsd_decay_style
        if self.decay_style == "WSD":
            if self.wsd_decay_steps is None or not 0 < self.wsd_decay_steps <= self.decay_steps - self.warmup_steps:
                raise ValueError(f"--lr-decay-style WSD needs 0 < --lr-wsd-decay-iters <= lr-decay-iters - "
                                 f"lr-warmup-iters = {self.decay_steps - self.warmup_steps} "
                                 f"(got {self.wsd_decay_steps})")
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style {self.wsd_decay_style!r} is unknown; use one of "
                                 f"{', '.join(WSD_DECAY_STYLES)}")
        self.num_steps = 0
        self.step(0)

    def get_lr(self, num_steps: Optional[int] = None) -> float:
        n = self.num_steps if num_steps is None else num_steps
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.warmup_init + (self.max_lr - self.warmup_init) * n / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_steps:
            return self.min_lr
        delta = self.max_lr - self.min_lr
        if self.decay_style == "WSD":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if n <= anneal_start:
                coeff = 1.0
            else:
                q = (n - anneal_start) / self.wsd_decay_steps
                coeff = {"linear": lambda: 1.0 - q, "cosine": lambda: 0.5 * (math.cos(math.pi * q) + 1.0),
                         "exponential": lambda: 2.0 * 0.5 ** q - 1.0,
                         "minus_sqrt": lambda: 1.0 - math.sqrt(q)}[self.wsd_decay_style]()
            return self.min_lr + coeff * delta
        r = (n - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - r
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * r) + 1.0)
        else:
            raise ValueError(f"--lr-decay-style {self.decay_style!r} is unknown; use constant, linear, cosine or WSD")
        return self.min_lr + coeff * delta

    def step(self, increment: int = 1) -> float:
        self.num_steps += increment
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _settings(self) -> Dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "lr_warmup_steps": self.warmup_steps,
                "lr_warmup_init": self.warmup_init,
                "lr_decay_steps": self.decay_steps, "lr_decay_style": self.decay_style,
                "lr_wsd_decay_steps": self.wsd_decay_steps, "lr_wsd_decay_style": self.wsd_decay_style}

    def state_dict(self) -> Dict:
        return dict(self._settings(), num_steps=self.num_steps)

    def settings_diff(self, sd: Dict) -> List[str]:
        """The settings that differ between a checkpoint's state_dict and this scheduler ('name: ckpt -> this')."""
        return [f"{k}: {sd[k]} -> {v}" for k, v in self._settings().items() if k in sd and sd[k] != v]

    def load_state_dict(self, sd: Dict, use_checkpoint_settings: bool = False) -> List[str]:
        """Restore the step count; keep this run's settings, or with ``use_checkpoint_settings`` take the
        checkpoint's (Megatron's --use-checkpoint-opt_param-scheduler). Returns settings_diff(sd) as it was."""
        changed = self.settings_diff(sd)
        if use_checkpoint_settings:
            self.max_lr, self.min_lr = float(sd.get("max_lr", self.max_lr)), float(sd.get("min_lr", self.min_lr))
            self.warmup_steps = _whole(sd.get("lr_warmup_steps", self.warmup_steps))
            self.decay_steps = _whole(sd.get("lr_decay_steps", self.decay_steps))
            self.decay_style = sd.get("lr_decay_style", self.decay_style)
            self.wsd_decay_steps = sd.get("lr_wsd_decay_steps", self.wsd_decay_steps)
            self.wsd_decay_style = sd.get("lr_wsd_decay_style", self.wsd_decay_style)
        self.num_steps = 0
        self.step(int(sd["num_steps"]))
        return changed
