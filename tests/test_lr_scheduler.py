"""LR schedules: warm-up then cosine / linear / constant / WSD, values at the phase boundaries and inside
them against the closed forms; the optimizer's param groups follow; state_dict resumes the count; bad
settings raise one clear error."""
import dataclasses
import math

import pytest

from megatron_ascend.config import OptimizerConfig
from megatron_ascend.optimizer import OptimizerParamScheduler


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": None}, {"lr": None}]


def _sched(train_iters=100, **kw):
    base = dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10)
    base.update(kw)
    opt = _Opt()
    return opt, OptimizerParamScheduler(opt, OptimizerConfig(**base), train_iters)


def test_warmup_then_cosine():
    opt, s = _sched(lr_decay_style="cosine")
    assert s.get_lr() == 0.0 and opt.param_groups[0]["lr"] == 0.0  # Megatron: first update at lr 0
    assert s.get_lr(5) == pytest.approx(0.5)
    assert s.get_lr(10) == pytest.approx(1.0)
    assert s.get_lr(55) == pytest.approx(0.55)  # half way: (max + min) / 2
    r = (30 - 10) / 90
    assert s.get_lr(30) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * r) + 1))
    assert s.get_lr(100) == pytest.approx(0.1) and s.get_lr(150) == 0.1
    for _ in range(55):
        s.step(1)
    assert all(g["lr"] == pytest.approx(0.55) for g in opt.param_groups)


def test_linear_constant_and_decay_iters():
    _, s = _sched(lr_decay_style="linear", lr_decay_iters=50)
    assert s.get_lr(30) == pytest.approx(0.1 + 0.9 * (1 - 20 / 40))
    assert s.get_lr(50) == pytest.approx(0.1) and s.get_lr(60) == 0.1
    _, c = _sched(lr_decay_style="constant")
    assert c.get_lr(5) == pytest.approx(0.5) and c.get_lr(10) == 1.0 and c.get_lr(10 ** 6) == 1.0
    # the trainer may pass the decay iterations explicitly (4th argument)
    opt = _Opt()
    s2 = OptimizerParamScheduler(opt, OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear"), 100, 20)
    assert s2.get_lr(10) == pytest.approx(0.5)


@pytest.mark.parametrize("style, q_to_coeff", [
    ("linear", lambda q: 1 - q), ("cosine", lambda q: 0.5 * (math.cos(math.pi * q) + 1)),
    ("exponential", lambda q: 2 * 0.5 ** q - 1), ("minus_sqrt", lambda q: 1 - math.sqrt(q))])
def test_wsd(style, q_to_coeff):
    _, s = _sched(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style=style)
    assert s.get_lr(5) == pytest.approx(0.5)  # warm-up
    assert s.get_lr(11) == 1.0 and s.get_lr(80) == 1.0  # stable until decay_iters - wsd_decay_iters
    for n in (85, 90, 99, 100):
        q = (n - 80) / 20
        assert s.get_lr(n) == pytest.approx(0.1 + 0.9 * q_to_coeff(q)), (style, n)
    assert s.get_lr(101) == 0.1


def test_state_dict_resume_and_changed_settings():
    opt, s = _sched(lr_decay_style="cosine")
    s.step(37)
    sd = s.state_dict()
    opt2, s2 = _sched(lr_decay_style="cosine")
    assert s2.load_state_dict(sd) == []
    assert s2.num_steps == 37 and opt2.param_groups[0]["lr"] == pytest.approx(s.get_lr())
    _, s3 = _sched(lr_decay_style="linear")
    changed = s3.load_state_dict(sd)
    assert changed == ["lr_decay_style: cosine -> linear"] and s3.num_steps == 37


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="lr-wsd-decay-iters"):
        _sched(lr_decay_style="WSD")
    with pytest.raises(ValueError, match="lr-wsd-decay-style"):
        _sched(lr_decay_style="WSD", lr_wsd_decay_iters=10, lr_wsd_decay_style="square")
    with pytest.raises(ValueError, match="must exceed --lr-warmup-iters"):
        _sched(lr_decay_style="cosine", lr_decay_iters=10)
    with pytest.raises(ValueError, match="train-iters"):
        _sched(train_iters=None, lr_decay_style="cosine")
    _sched(train_iters=None, lr_decay_style="constant")  # constant needs no decay iterations
