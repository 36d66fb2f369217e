"""capsnet.optim.schedules: the learning-rate sequences, their state, driving an optimizer,
and bad arguments."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from capsnet.layers.base import Parameter
from capsnet.optim import SGD, Adam, ExponentialLR, StepLR


# -- schedules ------------------------------------------------------------------------
def test_exponential_lr_sequence():
    opt = SGD([Parameter(np.zeros(2))], lr=0.2)
    sched = ExponentialLR(opt, gamma=0.5)
    seen = [opt.lr]
    for _ in range(5):
        sched.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, [0.2 * 0.5**k for k in range(6)], rtol=1e-15)
    resumed = ExponentialLR(SGD([Parameter(np.zeros(2))], lr=0.2), gamma=0.5, last_epoch=3)
    assert resumed.optimizer.lr == pytest.approx(0.2 * 0.125, rel=1e-15)


def test_exponential_lr_floor_as_efficient_capsnet_decays():
    opt = Adam([Parameter(np.zeros(2))], lr=5e-4)
    sched = ExponentialLR(opt, gamma=0.97, min_lr=5e-5)
    seen = [opt.lr]
    for _ in range(150):
        sched.step()
        seen.append(opt.lr)
    expected = np.maximum(5e-4 * 0.97 ** np.arange(151), 5e-5)
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[75] > 5e-5 and seen[76] == 5e-5  # 0.97^76 < 0.1: the floor from epoch 76 on
    with pytest.raises(ValueError, match=r"min_lr must be a finite number >= 0, got -1"):
        ExponentialLR(opt, gamma=0.9, min_lr=-1)


def test_exponential_lr_reads_a_state_saved_before_the_floor():
    opt = SGD([Parameter(np.zeros(2))], lr=0.3)
    sched = ExponentialLR(opt, gamma=0.5, min_lr=0.1)
    old = {k: v for k, v in ExponentialLR(SGD([Parameter(np.zeros(2))], lr=0.3), 0.5).state_dict().items()
           if k != "min_lr"}
    old["last_epoch"] = 3
    sched.load_state_dict(old)
    assert sched.min_lr == 0.0 and opt.lr == pytest.approx(0.3 * 0.125, rel=1e-15)


def test_step_lr_sequence():
    opt = Adam([Parameter(np.zeros(2))], lr=1.0)
    sched = StepLR(opt, step_size=3, gamma=0.1)
    seen = [opt.lr]
    for _ in range(8):
        sched.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, [1.0] * 3 + [0.1] * 3 + [0.01] * 3, rtol=1e-15)


@pytest.mark.parametrize("make", [lambda o: ExponentialLR(o, gamma=0.9), lambda o: StepLR(o, step_size=2, gamma=0.5)],
                         ids=["exponential", "step"])
def test_schedule_state_round_trip(make):
    opt = SGD([Parameter(np.zeros(2))], lr=0.3)
    sched = make(opt)
    for _ in range(5):
        sched.step()
    saved = pickle.loads(pickle.dumps(sched.state_dict()))
    other_opt = SGD([Parameter(np.zeros(2))], lr=99.0)
    other = make(other_opt)
    other.load_state_dict(saved)
    assert other_opt.lr == opt.lr and other.last_epoch == 5 and other.base_lr == 0.3
    for _ in range(4):
        sched.step()
        other.step()
        assert other_opt.lr == opt.lr


def test_schedule_drives_the_optimizer():
    p = Parameter(np.zeros(1))
    opt = SGD([p], lr=1.0)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    p.grad[...] = 1.0
    opt.step()
    sched.step()
    opt.step()
    np.testing.assert_array_equal(p.data, [-1.5])


def test_bad_schedule_arguments_are_rejected():
    opt = SGD([Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got 0.0"):
        ExponentialLR(opt, gamma=0)
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got -0.5"):
        StepLR(opt, step_size=2, gamma=-0.5)
    with pytest.raises(ValueError, match=r"step_size must be >= 1, got 0"):
        StepLR(opt, step_size=0)
    with pytest.raises(TypeError, match=r"step_size must be an integer, got 2.5"):
        StepLR(opt, step_size=2.5)
    with pytest.raises(ValueError, match=r"last_epoch must be >= 0, got -1"):
        ExponentialLR(opt, gamma=0.9, last_epoch=-1)
    with pytest.raises(TypeError, match=r"expected an Optimizer \(SGD, Adam\), got list"):
        ExponentialLR([opt], gamma=0.9)
    saved = StepLR(opt, step_size=2).state_dict()
    with pytest.raises(ValueError, match=r"saved by ExponentialLR, got one from 'StepLR'"):
        ExponentialLR(opt, gamma=0.9).load_state_dict(saved)
