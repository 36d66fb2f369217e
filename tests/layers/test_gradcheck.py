"""capsnet.gradcheck: it passes right gradients, and on a wrong one it says where and by how much."""
from __future__ import annotations

import re

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import GradcheckError, check_gradient, check_module
from capsnet.layers import Linear

FLOAT = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"


def cube_problem(xp, host_rng, shape):
    """f(x) = sum(x^3), whose gradient is 3 x^2."""
    x = backend.to_device(host_rng.standard_normal(shape))

    def f():
        return (x * x * x).sum()

    return x, f, 3 * x * x


def test_correct_gradient_passes_element_mode(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (3, 4))
    result = check_gradient(f, x, grad)
    assert result.mode == "elements" and result.checked == 12
    assert result.max_abs_error < 1e-8


def test_correct_gradient_passes_direction_mode(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (10, 10))
    result = check_gradient(f, x, grad, n_directions=5)
    assert result.mode == "directions" and result.checked == 5
    assert result.max_abs_error < 1e-7


def test_array_is_restored_after_checking(xp, host_rng):
    for shape in ((3, 4), (10, 10)):
        x, f, grad = cube_problem(xp, host_rng, shape)
        before = backend.to_numpy(x).copy()
        check_gradient(f, x, grad)
        np.testing.assert_array_equal(backend.to_numpy(x), before)


def test_wrong_gradient_element_mode_names_worst_index_and_both_values(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (3, 4))
    true = backend.to_numpy(grad).copy()
    wrong = true.copy()
    wrong[1, 2] += 0.5
    wrong[0, 3] += 1e-3  # also wrong, but less so: the message names the worst
    with pytest.raises(GradcheckError) as info:
        check_gradient(f, x, backend.to_device(wrong), name="x")
    message = str(info.value)
    assert "gradient of x is wrong at element (1, 2)" in message
    numeric = float(re.search("numeric " + FLOAT, message).group(1))
    analytic = float(re.search("analytic " + FLOAT, message).group(1))
    assert numeric == pytest.approx(true[1, 2], rel=1e-6)
    assert analytic == pytest.approx(wrong[1, 2], rel=1e-9)
    assert "eps=1e-06" in message and "rtol=1e-05" in message


def test_wrong_gradient_direction_mode_names_direction_and_both_values(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (10, 10))
    with pytest.raises(GradcheckError) as info:
        check_gradient(f, x, 2 * grad, name="big", n_directions=4)  # twice the truth along every direction
    message = str(info.value)
    match = re.search(r"gradient of big is wrong at random direction (\d+) \(directions, 4 checked\)", message)
    assert match and 0 <= int(match.group(1)) < 4
    numeric = float(re.search("numeric " + FLOAT, message).group(1))
    analytic = float(re.search("analytic " + FLOAT, message).group(1))
    assert analytic == pytest.approx(2 * numeric, rel=1e-5)
    assert abs(numeric) > 0


def test_single_wrong_direction_is_direction_zero(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (100,))
    with pytest.raises(GradcheckError, match="random direction 0 "):
        check_gradient(f, x, -grad, n_directions=1)


def test_non_finite_analytic_gradient_fails(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (3,))
    bad = backend.to_numpy(grad).copy()
    bad[1] = np.nan
    with pytest.raises(GradcheckError, match="not finite"):
        check_gradient(f, x, backend.to_device(bad))


def test_refuses_float32(xp, host_rng):
    x = backend.to_device(host_rng.standard_normal((3, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="float64.*float32"):
        check_gradient(lambda: (x * x).sum(), x, 2 * x)
    with pytest.raises(TypeError, match="float64.*float32"):
        check_module(Linear(4, 2, dtype="float32", seed=0), x)


def test_refuses_wrong_gradient_shape(xp, host_rng):
    x, f, grad = cube_problem(xp, host_rng, (3, 4))
    with pytest.raises(ValueError, match=re.escape("shape (4, 3), expected (3, 4)")):
        check_gradient(f, x, grad.T)


class HalfInputGrad(Linear):
    """A Linear whose input gradient is half the truth (weights are right)."""

    def backward(self, grad_out):
        return 0.5 * super().backward(grad_out)


class WrongWeightGrad(Linear):
    """A Linear whose weight gradient is off by 0.1 everywhere (its input gradient is right)."""

    def backward(self, grad_out):
        gx = super().backward(grad_out)
        self.weight.grad += 0.1
        return gx


def test_check_module_passes_a_correct_module(xp, host_rng):
    layer = Linear(5, 4, dtype="float64", seed=0)
    results = check_module(layer, backend.to_device(host_rng.standard_normal((3, 5))))
    assert [r.name for r in results] == ["input", "weight", "bias"]
    assert [r.mode for r in results] == ["elements", "elements", "elements"]


def test_check_module_catches_a_wrong_input_gradient(xp, host_rng):
    layer = HalfInputGrad(5, 4, dtype="float64", seed=0)
    with pytest.raises(GradcheckError, match="gradient of input is wrong at element"):
        check_module(layer, backend.to_device(host_rng.standard_normal((3, 5))))
    # without the input check, the (right) parameter gradients pass
    check_module(layer, backend.to_device(host_rng.standard_normal((3, 5))), check_input=False)


def test_check_module_catches_a_wrong_parameter_gradient(xp, host_rng):
    layer = WrongWeightGrad(5, 4, dtype="float64", seed=0)
    with pytest.raises(GradcheckError, match="gradient of weight is wrong"):
        check_module(layer, backend.to_device(host_rng.standard_normal((3, 5))))


def test_check_module_direction_mode_catches_a_wrong_parameter_gradient(xp, host_rng):
    layer = WrongWeightGrad(20, 10, dtype="float64", seed=0)  # 200 weights: random directions
    with pytest.raises(GradcheckError, match=r"gradient of weight is wrong at random direction \d+ \(directions"):
        check_module(layer, backend.to_device(host_rng.standard_normal((3, 20))), check_input=False)
