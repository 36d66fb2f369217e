"""capsnet.layers.capsule: squash, capsule length, PrimaryCaps, DigitCaps with dynamic routing
(against a per-example oracle, detached or not), the masks (one and two targets, the
longest capsules), float64 gradient checks on every backend, shape errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from capsnet import backend
from capsnet.data import both_right
from capsnet.gradcheck import check_gradient, check_module
from capsnet.layers import (
    CapsuleLength,
    DigitCaps,
    Mask,
    PrimaryCaps,
    Squash,
    capsule_length,
    capsule_length_backward,
    capsule_predictions,
    dynamic_routing,
    dynamic_routing_backward,
    longest_capsules,
    squash,
    squash_backward,
)

from tests.helpers import LABEL_ERRORS, dev, host, naive_conv2d


F64 = "float64"


def test_gradcheck_squash(xp, host_rng):
    check_module(Squash(), dev(host_rng.standard_normal((2, 3, 4))))


def test_gradcheck_squash_near_zero_length(xp, host_rng):
    s = host_rng.standard_normal((2, 3, 4))
    s *= host_rng.uniform(0.5e-3, 2e-3, (2, 3, 1)) / np.linalg.norm(s, axis=-1, keepdims=True)
    results = check_module(Squash(), dev(s))
    assert results[0].mode == "elements"


def test_gradcheck_capsule_length(xp, host_rng):
    check_module(CapsuleLength(), dev(host_rng.standard_normal((2, 3, 4))))


def test_gradcheck_primary_caps(xp, host_rng):
    layer = PrimaryCaps(3, n_types=2, dim=4, kernel_size=3, stride=2, dtype=F64, seed=0)
    results = check_module(layer, dev(host_rng.standard_normal((2, 3, 7, 7))))
    assert [r.name for r in results] == ["input", "conv.weight", "conv.bias"]


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_gradcheck_digit_caps(xp, host_rng, iterations):
    layer = DigitCaps(6, 4, 3, 5, iterations, dtype=F64, seed=0)
    u = squash(host_rng.standard_normal((2, 6, 4)))
    results = check_module(layer, dev(u), n_directions=16)
    assert [r.name for r in results] == ["input", "weight"]


def test_gradcheck_mask_by_labels(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    labels = dev(np.array([2, 0, 3]))
    check_module(Mask(), dev(v), forward_kwargs={"labels": labels}, check_input=True)


def test_gradcheck_mask_by_longest(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v *= np.array([[0.2, 0.5, 0.8, 0.3], [0.9, 0.1, 0.4, 0.6], [0.3, 0.2, 0.1, 0.7]])[..., None]
    check_module(Mask(), dev(v), check_input=True)


# -- squash and lengths at zero and tiny lengths ---------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_squash_and_length_at_zero_length(xp, host_rng, dtype):
    s = host_rng.standard_normal((2, 3, 4)).astype(dtype)
    s[0, 1] = 0
    s[1, 2] = 0
    s = dev(s)
    g = dev(host_rng.standard_normal((2, 3, 4)).astype(dtype))

    sq = Squash()
    v = sq.forward(s)
    gs = sq.backward(g)
    length = CapsuleLength()
    n = length.forward(s)
    gn = length.backward(dev(np.ones((2, 3), dtype)))
    for a in (v, gs, n, gn):
        assert a.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(host(a)))
    for b, j in ((0, 1), (1, 2)):
        assert np.all(host(v)[b, j] == 0)
        assert np.all(host(gs)[b, j] == 0)
        assert host(n)[b, j] == 0
        assert np.all(host(gn)[b, j] == 0)
    # the pure functions agree with the modules
    np.testing.assert_array_equal(host(squash(s)), host(v))
    np.testing.assert_array_equal(host(squash_backward(g, s)), host(gs))
    np.testing.assert_array_equal(host(capsule_length(s)), host(n))


@pytest.mark.parametrize("dtype,value", [("float32", 1e-30), ("float64", 1e-30), ("float32", 1e-42)],
                         ids=["float32-1e-30", "float64-1e-30", "float32-subnormal-1e-42"])
def test_squash_and_length_tiny_vectors_are_finite(xp, dtype, value):
    s = np.zeros((2, 3, 4), dtype)
    s[0, 0, 0] = value
    s[1, 2] = value
    assert s[0, 0, 0] != 0  # really tiny, not flushed to zero on the host
    s = dev(s)
    g = dev(np.ones((2, 3, 4), dtype))
    v = squash(s)
    gs = squash_backward(g, s)
    n = capsule_length(s)
    gn = capsule_length_backward(dev(np.ones((2, 3), dtype)), s, n)
    for a in (v, gs, n, gn):
        assert a.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(host(a)))
    # squash shrinks: |v| = |s|^2 / (1 + |s|^2) <= |s|, and lengths never exceed |s|_1
    assert np.all(np.abs(host(v)) <= np.abs(host(s)))
    assert np.all(host(n) <= np.abs(host(s)).sum(axis=-1) * (1 + 1e-6))


def test_squash_matches_equation_1(xp, host_rng):
    s = host_rng.standard_normal((3, 5, 6)) * host_rng.uniform(0.1, 3, (3, 5, 1))
    norm = np.linalg.norm(s, axis=-1, keepdims=True)
    expected = norm**2 / (1 + norm**2) * s / norm
    np.testing.assert_allclose(host(squash(dev(s))), expected, rtol=1e-13)
    np.testing.assert_allclose(host(capsule_length(dev(s))), norm[..., 0], rtol=1e-13)


# -- routing oracle ----------------------------------------------------------------------
def routing_one_example(u_hat, iterations):
    """Procedure 1 for one example, u_hat (I, J, D), with explicit loops over i and j.

    Returns v (J, D) and the last iteration's coupling coefficients c (I, J).
    """
    n_in, n_out, dim = u_hat.shape
    b = [[0.0] * n_out for _ in range(n_in)]
    for r in range(iterations):
        c = np.zeros((n_in, n_out))
        for i in range(n_in):
            top = max(b[i])
            e = [math.exp(b[i][j] - top) for j in range(n_out)]
            for j in range(n_out):
                c[i, j] = e[j] / sum(e)
        v = np.zeros((n_out, dim))
        for j in range(n_out):
            s = np.zeros(dim)
            for i in range(n_in):
                s += c[i, j] * u_hat[i, j]
            n2 = float(s @ s)
            v[j] = n2 / (1 + n2) * s / math.sqrt(n2)
        for i in range(n_in):
            for j in range(n_out):
                b[i][j] += float(u_hat[i, j] @ v[j])
    return v, c


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_routing_matches_per_example_oracle(xp, host_rng, iterations):
    u_hat = host_rng.standard_normal((4, 6, 3, 5)) * 0.5
    v, state = dynamic_routing(dev(u_hat), iterations)
    assert v.shape == (4, 3, 5)
    assert len(state.c) == len(state.s) == len(state.v) == iterations
    for example in range(4):
        ev, ec = routing_one_example(u_hat[example], iterations)
        np.testing.assert_allclose(host(v)[example], ev, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(host(state.c[-1])[example].T, ec, rtol=1e-10, atol=1e-13)


def test_routing_keeps_examples_independent(xp, host_rng):
    u_hat = host_rng.standard_normal((5, 6, 3, 4))
    v, _ = dynamic_routing(dev(u_hat), 3)
    changed = u_hat.copy()
    changed[2] = 3 * host_rng.standard_normal((6, 3, 4))
    v2, _ = dynamic_routing(dev(changed), 3)
    others = [0, 1, 3, 4]
    np.testing.assert_allclose(host(v2)[others], host(v)[others], rtol=1e-13, atol=1e-15)
    assert not np.allclose(host(v2)[2], host(v)[2])
    # and each example routes alone exactly as it does inside the batch
    for example in range(5):
        alone, _ = dynamic_routing(dev(changed[example:example + 1]), 3)
        np.testing.assert_allclose(host(alone)[0], host(v2)[example], rtol=1e-12, atol=1e-14)


def test_coupling_coefficients_sum_to_one_over_outputs(xp, host_rng):
    u_hat = host_rng.standard_normal((3, 7, 4, 5)) * 2
    _, state = dynamic_routing(dev(u_hat), 4)
    for r, c in enumerate(state.c):
        c = host(c)
        assert c.shape == (3, 4, 7)
        assert np.all(c > 0)
        np.testing.assert_allclose(c.sum(axis=1), np.ones((3, 7)), rtol=1e-12)
    # the first iteration is uniform, later ones are not
    np.testing.assert_allclose(host(state.c[0]), 0.25)
    assert np.ptp(host(state.c[-1])) > 1e-3


def test_routing_rejects_bad_iterations(xp, host_rng):
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        dynamic_routing(dev(host_rng.standard_normal((1, 2, 2, 2))), 0)


# -- detach_routing ----------------------------------------------------------------------
def _digit_grads(host_rng, iterations, detach):
    layer = DigitCaps(6, 4, 3, 5, iterations, detach_routing=detach, init_std=0.5, dtype=F64, seed=7)
    u = dev(squash(host_rng.standard_normal((2, 6, 4))))
    grad_out = dev(host_rng.standard_normal((2, 3, 5)))
    layer.forward(u)
    gu = layer.backward(grad_out)
    return layer, u, grad_out, host(gu), host(layer.weight.grad)


def test_detach_routing_with_one_iteration_equals_full_gradient(xp):
    _, _, _, gu_full, gw_full = _digit_grads(np.random.default_rng(5), 1, False)
    _, _, _, gu_det, gw_det = _digit_grads(np.random.default_rng(5), 1, True)
    np.testing.assert_allclose(gu_det, gu_full, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gw_det, gw_full, rtol=1e-13, atol=1e-15)


def test_detach_routing_with_three_iterations_holds_final_couplings_fixed(xp):
    _, _, _, gu_full, gw_full = _digit_grads(np.random.default_rng(5), 3, False)
    layer, u, grad_out, gu_det, gw_det = _digit_grads(np.random.default_rng(5), 3, True)
    assert not np.allclose(gu_det, gu_full, rtol=1e-3)
    assert not np.allclose(gw_det, gw_full, rtol=1e-3)

    _, state = dynamic_routing(capsule_predictions(u, layer.weight.data), 3)
    c_final = state.c[-1]  # (B, J, I), held fixed below

    def last_iteration_loss():
        u_hat = capsule_predictions(u, layer.weight.data)  # (B, I, J, D)
        s = (c_final.transpose(0, 2, 1)[..., None] * u_hat).sum(axis=1)  # s_j = sum_i c_ij u_hat_j|i
        return (squash(s) * grad_out).sum()

    check_gradient(last_iteration_loss, u, dev(gu_det), name="u")
    check_gradient(last_iteration_loss, layer.weight.data, dev(gw_det), name="weight", n_directions=16)


# -- Mask ----------------------------------------------------------------------------------
def test_mask_by_labels_keeps_the_label_capsule(xp, host_rng):
    v = host_rng.standard_normal((3, 4, 5))
    labels = np.array([2, 0, 3])
    mask = Mask()
    out = host(mask.forward(dev(v), dev(labels)))
    assert out.shape == (3, 20)
    out = out.reshape(3, 4, 5)
    for b in range(3):
        for j in range(4):
            expected = v[b, j] if j == labels[b] else np.zeros(5)
            np.testing.assert_array_equal(out[b, j], expected)
    g = host_rng.standard_normal((3, 20))
    gv = host(mask.backward(dev(g))).reshape(3, 4, 5)
    for b in range(3):
        for j in range(4):
            expected = g.reshape(3, 4, 5)[b, j] if j == labels[b] else np.zeros(5)
            np.testing.assert_array_equal(gv[b, j], expected)


def test_mask_by_longest_picks_argmax_length(xp, host_rng):
    v = host_rng.standard_normal((6, 4, 5))
    v[1, 3] *= 10  # make sure not every example picks the same capsule
    longest = np.linalg.norm(v, axis=-1).argmax(axis=1)
    mask = Mask()
    out = host(mask.forward(dev(v))).reshape(6, 4, 5)
    for b in range(6):
        np.testing.assert_array_equal(out[b, longest[b]], v[b, longest[b]])
        others = [j for j in range(4) if j != longest[b]]
        assert np.all(out[b, others] == 0)
    gv = host(mask.backward(dev(np.ones((6, 20))))).reshape(6, 4, 5)
    np.testing.assert_array_equal(np.abs(gv).sum(axis=-1) > 0, np.arange(4)[None, :] == longest[:, None])


# -- PrimaryCaps capsule layout -----------------------------------------------------------------
def test_primary_caps_layout_matches_docstring(xp, host_rng):
    layer = PrimaryCaps(3, n_types=2, dim=4, kernel_size=3, stride=2, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 7, 7))
    caps = host(layer.forward(dev(x)))
    y = naive_conv2d(x, host(layer.conv.weight.data), host(layer.conv.bias.data), 2, 0)  # (2, 8, 3, 3)
    assert caps.shape == (2, 2 * 3 * 3, 4) and layer.n_capsules(7, 7) == 18
    for t in range(2):
        for oy in range(3):
            for ox in range(3):
                s = y[:, t * 4:(t + 1) * 4, oy, ox]
                n2 = (s * s).sum(axis=1, keepdims=True)
                np.testing.assert_allclose(caps[:, t * 9 + oy * 3 + ox], n2 / (1 + n2) * s / np.sqrt(n2),
                                           rtol=1e-10, atol=1e-13)


# -- errors -----------------------------------------------------------------------------------
def test_digitcaps_wrong_input_shape_message():
    layer = DigitCaps(in_caps=1152, in_dim=8, out_caps=10, out_dim=16)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((32, 1152, 16), np.float32))
    assert str(info.value) == "DigitCaps expected input of shape (batch, 1152, 8), got (32, 1152, 16)"


@pytest.mark.parametrize("labels,error,message", LABEL_ERRORS, ids=["too-big", "negative", "2d", "long", "float"])
def test_mask_label_errors(labels, error, message):
    with pytest.raises(error, match="Mask expected " + message):
        Mask().forward(np.zeros((2, 3, 4)), labels)


def test_routing_backward_may_overwrite_u_hat_and_predictions_take_out(xp, host_rng):
    u = dev(squash(host_rng.standard_normal((2, 6, 4))))
    w = dev(host_rng.standard_normal((6, 3, 5, 4)) * 0.5)
    u_hat = capsule_predictions(u, w)
    again = capsule_predictions(u, w, out=dev(np.zeros(u_hat.shape)))
    np.testing.assert_array_equal(host(again), host(u_hat))
    v, state = dynamic_routing(u_hat, 3)
    gv = dev(host_rng.standard_normal(v.shape))
    expected = host(dynamic_routing_backward(gv, u_hat, state))
    got = dynamic_routing_backward(gv, u_hat, state, out=u_hat)
    assert got is u_hat
    np.testing.assert_allclose(host(got), expected, rtol=1e-12, atol=1e-14)


PAIRS = np.array([[1, 0], [2, 1]])


def test_mask_keeps_one_capsule_per_target_target_major(xp, host_rng):
    v = host_rng.standard_normal((2, 3, 4))
    out = host(Mask(2)(dev(v), dev(PAIRS)))
    assert out.shape == (4, 12)
    for t in range(2):
        for b in range(2):
            keep = np.zeros((3, 1))
            keep[PAIRS[b, t]] = 1
            np.testing.assert_array_equal(out[t * 2 + b], (v[b] * keep).ravel())


def test_mask_without_labels_keeps_the_two_longest_in_class_order(xp, host_rng):
    v = host_rng.standard_normal((2, 4, 3))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v *= np.array([[0.9, 0.1, 0.2, 0.8], [0.3, 0.7, 0.95, 0.1]])[..., None]
    out = host(Mask(2)(dev(v))).reshape(2, 2, 4, 3)  # (target, example, class, dim)
    kept = np.abs(out).sum(axis=-1) > 0
    assert kept[:, 0].nonzero()[1].tolist() == [0, 3]  # example 0: classes 0 and 3, in increasing order
    assert kept[:, 1].nonzero()[1].tolist() == [1, 2]


def longest_oracle(lengths, t):
    """Per example: the t longest classes in class order; ties as longest_capsules promises
    (t = 1: the lowest of the longest classes; t > 1: of equal lengths, the higher classes)."""
    out = []
    for row in lengths:
        if t == 1:
            out.append([min(j for j in range(len(row)) if row[j] == row.max())])
        else:
            out.append(sorted(sorted(range(len(row)), key=lambda j: (row[j], j))[-t:]))
    return np.array(out)


@pytest.mark.parametrize("classes", [3, 10, 40])  # 40: past the insertion-sort size of NumPy's default sort
@pytest.mark.parametrize("t", [1, 2, 3])
def test_longest_capsules_match_a_per_example_loop_ties_included(xp, host_rng, classes, t):
    lengths = host_rng.integers(0, 4, (64, classes)) / 4  # few distinct values: many ties at the cut
    got = longest_capsules(dev(lengths), t)
    assert backend.get_array_module(got) is xp and got.shape == (64, t) and got.dtype.kind in "iu"
    np.testing.assert_array_equal(host(got), longest_oracle(lengths, t))
    distinct = host_rng.permutation(classes * 64).reshape(64, classes).astype(float)
    np.testing.assert_array_equal(host(longest_capsules(dev(distinct), t)), longest_oracle(distinct, t))


def test_mask_and_both_right_choose_the_longest_capsules(xp, host_rng):
    v = host_rng.standard_normal((32, 10, 4))
    v[:, 3] = v[:, 7]  # equal lengths in every example
    chosen = longest_oracle((v * v).sum(-1), 2)
    kept = np.abs(host(Mask(2)(dev(v))).reshape(2, 32, 10, 4)).sum(-1) > 0  # (target, example, class)
    np.testing.assert_array_equal(kept.argmax(-1).T, chosen)
    scores = host_rng.integers(0, 3, (32, 10)) / 2
    labels = np.stack([host_rng.permutation(10)[:2] for _ in range(32)])  # the loop builds test data only
    expected = sum(sorted(labels[b]) == longest_oracle(scores[b:b + 1], 2)[0].tolist() for b in range(32))
    assert int(host(both_right(dev(scores), (None, dev(labels))))) == expected
    labels[:, 0], labels[:, 1] = longest_oracle(scores, 2).T
    assert int(host(both_right(dev(scores), (None, dev(labels[:, ::-1].copy()))))) == 32


def test_longest_capsules_refuses_what_it_cannot_choose(xp):
    with pytest.raises(ValueError, match=r"expected t an integer in \[1, 3\], got 4"):
        longest_capsules(dev(np.zeros((2, 3))), 4)
    with pytest.raises(ValueError, match=r"lengths of shape \(batch, n_caps\), got \(2, 3, 4\)"):
        longest_capsules(dev(np.zeros((2, 3, 4))), 1)


def test_gradcheck_two_target_mask(xp, host_rng):
    v = host_rng.standard_normal((2, 3, 4))
    check_module(Mask(2), dev(v), forward_kwargs={"labels": dev(PAIRS)})
