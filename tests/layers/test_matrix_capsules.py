"""EM routing (capsnet.layers.matrix_capsules): a per-example loop oracle of Procedure 1, float64
gradient checks on every backend (one and three iterations, detach, a single child, near-zero
variances, stride 2, coordinate addition), limits that must stay finite, the spread loss by
hand, errors, and float64 parity with the PyTorch reference (scripts/torch_matrix_capsnet.py)
when torch is installed: outputs, loss and every gradient."""
from __future__ import annotations

import math

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_gradient, check_module
from capsnet.layers import (
    ClassCaps,
    ConvCaps,
    MatrixPrimaryCaps,
    SpreadLoss,
    em_routing,
    em_routing_backward,
    matrix_votes,
    matrix_votes_backward,
    spread_loss,
    spread_loss_backward,
    spread_margin,
)

from tests.helpers import dev, host, reference


F64 = "float64"


# -- the oracle: Procedure 1 for one example, loops and the Gaussian density itself -----------------
def em_one_example(votes, a_in, beta_u, beta_a, iterations, lam, floor):
    n_in, n_out, p = votes.shape
    R = np.full((n_in, n_out), 1.0 / n_out)
    for t in range(iterations):
        lam_t = lam * (t + 1) / iterations
        mean, var, act = np.zeros((n_out, p)), np.zeros((n_out, p)), np.zeros(n_out)
        for j in range(n_out):
            r = [R[i, j] * a_in[i] for i in range(n_in)]
            m = sum(r)
            mean[j] = sum(r[i] * votes[i, j] for i in range(n_in)) / (m + 1e-8)
            var[j] = sum(r[i] * (votes[i, j] - mean[j]) ** 2 for i in range(n_in)) / (m + 1e-8) + floor
            cost = sum((beta_u[j] + math.log(math.sqrt(var[j, h]))) * m * n_out / n_in for h in range(p))
            act[j] = 1 / (1 + math.exp(-lam_t * (beta_a[j] - cost)))
        if t == iterations - 1:
            return mean, act
        for i in range(n_in):
            dens = [act[j] * math.prod(math.exp(-(votes[i, j, h] - mean[j, h]) ** 2 / (2 * var[j, h]))
                                       / math.sqrt(2 * math.pi * var[j, h]) for h in range(p)) for j in range(n_out)]
            R[i] = [d / sum(dens) for d in dens]


def routing_inputs(rng, b=2, i=6, j=3, p=4, spread=1.0):
    votes = rng.standard_normal((b, i, j, p)) * spread
    a_in = rng.uniform(0.2, 1.0, (b, i))
    beta_u = rng.standard_normal(j) * 0.3
    beta_a = rng.standard_normal(j) * 0.3
    return votes, a_in, beta_u, beta_a


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_em_routing_matches_per_example_oracle(xp, host_rng, iterations):
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng)
    mean, a, state = em_routing(*map(dev, (votes, a_in, beta_u, beta_a)), iterations, 0.3, 1e-4)
    assert mean.shape == (2, 3, 4) and a.shape == (2, 3) and len(state.a) == iterations
    for example in range(2):
        em, ea = em_one_example(votes[example], a_in[example], beta_u, beta_a, iterations, 0.3, 1e-4)
        np.testing.assert_allclose(host(mean)[example], em, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host(a)[example], ea, rtol=1e-10, atol=1e-12)
    for R in state.R:
        np.testing.assert_allclose(host(R).sum(axis=1), 1, rtol=1e-12)  # R: (B, J, I)


def test_em_routing_keeps_examples_independent(xp, host_rng):
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng, b=4)
    mean, a, _ = em_routing(*map(dev, (votes, a_in, beta_u, beta_a)), 3)
    for example in range(4):
        m1, a1, _ = em_routing(dev(votes[example:example + 1]), dev(a_in[example:example + 1]), dev(beta_u),
                               dev(beta_a), 3)
        np.testing.assert_allclose(host(m1)[0], host(mean)[example], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(host(a1)[0], host(a)[example], rtol=1e-12, atol=1e-14)


def test_float32_keeps_agreeing_votes_far_from_zero(xp, host_rng):
    """Votes 30 +- 0.02: without centring, E[V^2] - mu^2 in float32 loses the variance (900 against
    4e-4) and the E-step's expanded exponent its differences; centred, float32 follows float64."""
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng, b=3, i=9, j=4, p=16)
    votes = 30 + 0.02 * votes
    ref_mean, ref_a, ref_state = em_routing(*map(dev, (votes, a_in, beta_u, beta_a)), 3, 1.0, 1e-4)
    mean, a, state = em_routing(*(dev(x.astype(np.float32)) for x in (votes, a_in, beta_u, beta_a)), 3, 1.0, 1e-4)
    np.testing.assert_allclose(host(state.var[-1]), host(ref_state.var[-1]), rtol=2e-3)
    np.testing.assert_allclose(host(state.R[-1]), host(ref_state.R[-1]), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(host(a), host(ref_a), rtol=1e-4)
    np.testing.assert_allclose(host(mean), host(ref_mean), rtol=1e-6)


# -- gradient checks of the pure pair ----------------------------------------------------------------------
def _check_routing_gradients(votes, a_in, beta_u, beta_a, iterations, rng, detach=False, **kwargs):
    arrays = [dev(x) for x in (votes, a_in, beta_u, beta_a)]
    g_mean = dev(rng.standard_normal((votes.shape[0], votes.shape[2], votes.shape[3])))
    g_a = dev(rng.standard_normal((votes.shape[0], votes.shape[2])))
    mean, a, state = em_routing(*arrays, iterations, **kwargs)
    grads = em_routing_backward(g_mean, g_a, arrays[1], arrays[2], state, detach)

    def loss():
        m, act, _ = em_routing(*arrays, iterations, **kwargs)
        return (m * g_mean).sum() + (act * g_a).sum()

    for array, grad, name in zip(arrays, grads, ("votes", "a_in", "beta_u", "beta_a")):
        check_gradient(loss, array, grad, name=name, n_directions=16)
    return grads


@pytest.mark.parametrize("iterations", [1, 3])
def test_gradcheck_em_routing(xp, host_rng, iterations):
    _check_routing_gradients(*routing_inputs(host_rng), iterations, host_rng, inverse_temperature=0.5)


def test_gradcheck_em_routing_single_child(xp, host_rng):
    """I = 1: each parent's mean is the vote and its variance the floor."""
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng, i=1)
    mean, _, state = em_routing(*map(dev, (votes, a_in, beta_u, beta_a)), 3)
    np.testing.assert_allclose(host(mean), votes[:, 0], rtol=1e-7)
    np.testing.assert_allclose(host(state.var[-1]), 1e-4, rtol=1e-8)  # the mean is V m / (m + 1e-8)
    _check_routing_gradients(votes, a_in, beta_u, beta_a, 3, host_rng, inverse_temperature=0.01)


def test_gradcheck_em_routing_near_zero_variance(xp, host_rng):
    """Votes that agree to 1e-4: the fitted variances sit within a factor of two of the floor."""
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng)
    votes = votes[:, :1] + 1e-4 * host_rng.standard_normal(votes.shape)
    _, _, state = em_routing(*map(dev, (votes, a_in, beta_u, beta_a)), 3)
    assert host(state.var[-1]).max() < 3e-4
    _check_routing_gradients(votes, a_in, beta_u, beta_a, 3, host_rng, inverse_temperature=0.01)


def test_detach_with_one_iteration_is_the_full_gradient(xp, host_rng):
    inputs = routing_inputs(host_rng)
    full = _check_routing_gradients(*inputs, 1, np.random.default_rng(3))
    detached = _check_routing_gradients(*inputs, 1, np.random.default_rng(3), detach=True)
    for f, d in zip(full, detached):
        np.testing.assert_allclose(host(d), host(f), rtol=1e-13, atol=1e-15)


def test_detach_holds_the_last_assignments_fixed(xp, host_rng):
    """With detach, the gradient is that of the last M-step alone, its R a constant."""
    votes, a_in, beta_u, beta_a = (dev(x) for x in routing_inputs(host_rng))
    g_mean = dev(host_rng.standard_normal((2, 3, 4)))
    g_a = dev(host_rng.standard_normal((2, 3)))
    _, _, state = em_routing(votes, a_in, beta_u, beta_a, 3, inverse_temperature=1.0)  # lambda = 1 at the end
    g_full = em_routing_backward(g_mean, g_a, a_in, beta_u, state)
    g_det = em_routing_backward(g_mean, g_a, a_in, beta_u, state, detach=True)
    assert not np.allclose(host(g_det[0]), host(g_full[0]), rtol=1e-3)
    R_last = state.R[-1].transpose(0, 2, 1)  # (B, I, J)

    def last_m_step():
        xp_ = backend.get_array_module(votes)
        r = R_last * a_in[:, :, None]
        m = r.sum(axis=1)
        w = r / (m + 1e-8)[:, None, :]
        mean = (w[..., None] * votes).sum(axis=1)
        var = (w[..., None] * (votes - mean[:, None]) ** 2).sum(axis=1) + 1e-4
        cost = ((beta_u[:, None] + 0.5 * xp_.log(var)) * (m * 3 / 6)[..., None]).sum(axis=2)
        a = 1 / (1 + xp_.exp(-(beta_a - cost)))
        return (mean * g_mean).sum() + (a * g_a).sum()

    for array, grad, name in zip((votes, a_in, beta_u, beta_a), g_det, ("votes", "a_in", "beta_u", "beta_a")):
        check_gradient(last_m_step, array, grad, name=name, n_directions=16)


# -- layers ---------------------------------------------------------------------------------------------
def check_two_in_two_out(module, poses, activations, rng, n_directions=12):
    """check_module for a layer of two inputs and two outputs: both input gradients and every parameter."""
    module.train()
    out_p, out_a = module.forward(poses, activations)
    g_p = dev(rng.standard_normal(out_p.shape))
    g_a = dev(rng.standard_normal(out_a.shape))
    module.zero_grad()
    gin_p, gin_a = module.backward(g_p, g_a)
    params = [(name, p.data, p.grad.copy()) for name, p in module.named_parameters()]

    def loss():
        p_, a_ = module.forward(poses, activations)
        module.release()
        return (p_ * g_p).sum() + (a_ * g_a).sum()

    results = [check_gradient(loss, poses, gin_p, name="poses", n_directions=n_directions),
               check_gradient(loss, activations, gin_a, name="activations", n_directions=n_directions)]
    for name, data, grad in params:
        results.append(check_gradient(loss, data, grad, name=name, n_directions=n_directions))
    return results


def capsule_map(rng, b, h, w, c):
    return dev(rng.standard_normal((b, h, w, c, 4, 4)) * 0.5), dev(rng.uniform(0.1, 0.9, (b, h, w, c)))


@pytest.mark.parametrize("stride,iterations", [(1, 1), (1, 3), (2, 3)], ids=["stride1-1iter", "stride1-3iter",
                                                                           "stride2-3iter"])
def test_gradcheck_convcaps(xp, host_rng, stride, iterations):
    layer = ConvCaps(2, 3, kernel_size=2, stride=stride, iterations=iterations, inverse_temperature=0.1, dtype=F64,
                     seed=0)
    layer.beta_u.data[...] = dev(host_rng.standard_normal(3) * 0.1)
    layer.beta_a.data[...] = dev(host_rng.standard_normal(3) * 0.1)
    poses, acts = capsule_map(host_rng, 2, 5, 4, 2)
    results = check_two_in_two_out(layer, poses, acts, host_rng)
    assert [r.name for r in results] == ["poses", "activations", "weight", "beta_u", "beta_a"]


def test_gradcheck_convcaps_detached(xp, host_rng):
    layer = ConvCaps(2, 2, kernel_size=2, stride=1, iterations=3, inverse_temperature=0.1, detach_routing=True,
                     dtype=F64, seed=1)
    poses, acts = capsule_map(host_rng, 1, 3, 3, 2)
    out = layer.forward(poses, acts)
    g = layer.backward(dev(np.ones(out[0].shape)), dev(np.ones(out[1].shape)))
    full = ConvCaps(2, 2, kernel_size=2, stride=1, iterations=3, inverse_temperature=0.1, dtype=F64, seed=1)
    full.forward(poses, acts)
    g_full = full.backward(dev(np.ones(out[0].shape)), dev(np.ones(out[1].shape)))
    assert not np.allclose(host(g[0]), host(g_full[0]), rtol=1e-3)


@pytest.mark.parametrize("coordinate_addition", [True, False])
def test_gradcheck_classcaps(xp, host_rng, coordinate_addition):
    layer = ClassCaps(2, 3, iterations=3, coordinate_addition=coordinate_addition, inverse_temperature=0.1,
                      dtype=F64, seed=0)
    poses, acts = capsule_map(host_rng, 2, 3, 2, 2)
    results = check_two_in_two_out(layer, poses, acts, host_rng)
    assert [r.name for r in results] == ["poses", "activations", "weight", "beta_u", "beta_a"]


def test_coordinate_addition_moves_the_right_hand_column(xp, host_rng):
    """Same poses at two positions: their votes differ by the scaled offset in entries (0, 3) and (1, 3) only."""
    layer = ClassCaps(1, 2, iterations=1, inverse_temperature=0.1, dtype=F64, seed=0)
    pose = host_rng.standard_normal((1, 1, 1, 1, 4, 4))
    poses = np.broadcast_to(pose, (1, 2, 3, 1, 4, 4)).copy()  # the same pose at every position
    layer.forward(dev(poses), dev(np.full((1, 2, 3, 1), 0.5)))
    state = layer._pop()[2]
    votes = host(state.U + state.centre[:, :, None, :]).reshape(2, 2, 3, 16)  # (class, y, x, entry)
    offset = votes - votes[:, :1, :1]
    np.testing.assert_allclose(offset[:, 1, 2, 3], 1 / 2)
    np.testing.assert_allclose(offset[:, 1, 2, 7], 2 / 3)
    offset[..., 3] = offset[..., 7] = 0
    np.testing.assert_allclose(offset, 0, atol=1e-12)


def test_gradcheck_matrix_primary_caps(xp, host_rng):
    layer = MatrixPrimaryCaps(3, n_types=2, dtype=F64, seed=0)
    x = dev(host_rng.standard_normal((2, 3, 3, 2)))
    poses, acts = layer.forward(x)
    assert poses.shape == (2, 3, 2, 2, 4, 4) and acts.shape == (2, 3, 2, 2)
    g_p, g_a = dev(host_rng.standard_normal(poses.shape)), dev(host_rng.standard_normal(acts.shape))
    layer.zero_grad()
    gx = layer.backward(g_p, g_a)

    def loss():
        p, a = layer.forward(x)
        return (p * g_p).sum() + (a * g_a).sum()

    check_gradient(loss, x, gx, name="input")
    for name, p in layer.named_parameters():
        check_gradient(loss, p.data, p.grad.copy(), name=name)


def test_convcaps_matches_routing_each_window(xp, host_rng):
    """The layer equals em_routing run on each window's votes, gathered by hand."""
    layer = ConvCaps(2, 3, kernel_size=2, stride=2, iterations=2, dtype=F64, seed=4)
    poses, acts = capsule_map(host_rng, 1, 4, 5, 2)
    out_p, out_a = layer.forward(poses, acts)
    assert out_p.shape == (1, 2, 2, 3, 4, 4) and out_a.shape == (1, 2, 2, 3)
    P, A, W = host(poses), host(acts), host(layer.weight.data)
    for oy in range(2):
        for ox in range(2):
            window = P[0, 2 * oy:2 * oy + 2, 2 * ox:2 * ox + 2]  # (ky, kx, c, 4, 4)
            votes = np.einsum("yxcrk,yxcjks->yxcjrs", window, W).reshape(1, 8, 3, 16)
            a_in = A[0, 2 * oy:2 * oy + 2, 2 * ox:2 * ox + 2].reshape(1, 8)
            mean, a, _ = em_routing(votes, a_in, host(layer.beta_u.data), host(layer.beta_a.data), 2)
            np.testing.assert_allclose(host(out_p)[0, oy, ox].reshape(3, 16), mean[0], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(host(out_a)[0, oy, ox], a[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["convcaps", "classcaps"])
def test_evaluation_in_blocks_equals_training_whole(xp, host_rng, monkeypatch, which):
    """Evaluation routes the groups in blocks (here of one or two groups, the last one short);
    the outputs are those of the training-mode forward, which routes all groups at once."""
    import capsnet.layers.matrix_capsules as mc

    if which == "convcaps":
        layer = ConvCaps(2, 3, kernel_size=2, stride=1, iterations=3, dtype=F64, seed=4)  # 3 x 4 positions
        group_bytes = 2 * 3 * 8 * 16 * 8
    else:
        layer = ClassCaps(2, 3, iterations=3, dtype=F64, seed=4)
        group_bytes = 2 * 3 * 2 * 4 * 5 * 16 * 8
    poses, acts = capsule_map(host_rng, 3, 4, 5, 2)
    whole = layer.forward(poses, acts)
    layer.eval()
    for groups in (1, 2):
        monkeypatch.setattr(mc, "EVAL_BLOCK_BYTES", groups * group_bytes)
        monkeypatch.setattr(mc, "EVAL_BLOCK_GROUPS", 1)
        for got, want in zip(layer.forward(poses, acts), whole):
            np.testing.assert_allclose(host(got), host(want), rtol=1e-12, atol=1e-14)


def test_matrix_votes_are_pose_times_transform(xp, host_rng):
    poses = host_rng.standard_normal((3, 2, 4, 4))
    w = host_rng.standard_normal((2, 5, 4, 4))
    votes = host(matrix_votes(dev(poses), dev(w)))
    assert votes.shape == (3, 2, 5, 4, 4)
    np.testing.assert_allclose(votes[1, 0, 3], poses[1, 0] @ w[0, 3], rtol=1e-12)



def test_gradcheck_matrix_votes(xp, host_rng):
    """matrix_votes_backward (the public functions' child-major path; the layers use the
    parent-major products, checked through their own gradient checks)."""
    poses, w = dev(host_rng.standard_normal((3, 2, 4, 4))), dev(host_rng.standard_normal((2, 5, 4, 4)))
    g = dev(host_rng.standard_normal((3, 2, 5, 4, 4)))
    g_poses, g_w = matrix_votes_backward(g, poses, w)

    def loss():
        return (matrix_votes(poses, w) * g).sum()

    check_gradient(loss, poses, g_poses, name="poses")
    check_gradient(loss, w, g_w, name="w")

# -- limits ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_limits_stay_finite(xp, host_rng, dtype):
    """Activations at 0 and 1, identical votes (variance at the floor), huge and tiny votes, huge betas:
    no NaN or inf forward or backward, and no floating-point warning."""
    big = 1e6 if dtype == "float32" else 1e100
    cases = {
        "zero activations": (host_rng.standard_normal((2, 6, 3, 16)), np.zeros((2, 6))),
        "unit activations": (host_rng.standard_normal((2, 6, 3, 16)), np.ones((2, 6))),
        "identical votes": (np.ones((2, 6, 3, 16)), np.ones((2, 6))),
        "huge votes": (host_rng.standard_normal((2, 6, 3, 16)) * big, host_rng.uniform(0, 1, (2, 6))),
        "tiny votes": (host_rng.standard_normal((2, 6, 3, 16)) * 1e-30, host_rng.uniform(0, 1, (2, 6))),
        "one child": (host_rng.standard_normal((2, 1, 3, 16)), np.ones((2, 1))),
    }
    for beta in (0.0, 1e4, -1e4):
        for name, (votes, a_in) in cases.items():
            args = [dev(x.astype(dtype)) for x in (votes, a_in, np.full(3, beta), np.full(3, -beta))]
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                mean, a, state = em_routing(*args, 3, inverse_temperature=10.0)
                grads = em_routing_backward(dev(np.ones(mean.shape, dtype)), dev(np.ones(a.shape, dtype)),
                                            args[1], args[2], state)
            for value in (mean, a, *grads):
                assert value.dtype == np.dtype(dtype), name
                assert np.all(np.isfinite(host(value))), f"{name}, beta {beta}"


# -- the spread loss ----------------------------------------------------------------------------------
def test_spread_loss_by_hand(xp):
    a = dev(np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.25]]))
    labels = dev(np.array([0, 1]))
    # example 0: gaps 0.4 - 0.4 = 0, 0.4 - 0.8 < 0 -> 0; example 1: 0.4 - 0.1 = 0.3, 0.4 - 0.05 = 0.35
    expected = (0.3 ** 2 + 0.35 ** 2) / 2
    np.testing.assert_allclose(float(spread_loss(a, labels, 0.4)), expected, rtol=1e-12)
    g = host(spread_loss_backward(a, labels, 0.4))
    np.testing.assert_allclose(g, [[0, 0, 0], [0.3, -0.65, 0.35]], rtol=1e-12, atol=1e-15)


def test_gradcheck_spread_loss(xp, host_rng):
    a = host_rng.uniform(0, 1, (4, 5))
    check_module(SpreadLoss(margin=0.5), dev(a), dev(np.array([0, 3, 4, 1])), check_input=True)


def test_spread_margin_schedule():
    assert spread_margin(0.0) == pytest.approx(0.2)
    assert spread_margin(1.0) == pytest.approx(0.9)
    assert spread_margin(0.5) == pytest.approx(0.55)
    assert spread_margin(2.0) == pytest.approx(0.9)
    loss = SpreadLoss()
    loss.set_progress(1.0)
    assert loss.margin == pytest.approx(0.9)


# -- errors ---------------------------------------------------------------------------------------------
def test_errors():
    layer = ConvCaps(8, 16)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((2, 6, 6, 4, 4, 4), np.float32), np.zeros((2, 6, 6, 4), np.float32))
    assert str(info.value) == ("ConvCaps expected input poses of shape (batch, any, any, 8, 4, 4), "
                               "got (2, 6, 6, 4, 4, 4)")
    with pytest.raises(ValueError, match=r"ConvCaps expected input activations of shape \(2, 6, 6, 8\), got"):
        layer.forward(np.zeros((2, 6, 6, 8, 4, 4), np.float32), np.zeros((2, 6, 5, 8), np.float32))
    with pytest.raises(ValueError, match="convolution output would be empty"):
        layer.forward(np.zeros((1, 2, 2, 8, 4, 4), np.float32), np.zeros((1, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        ClassCaps(4, 10, iterations=0)
    with pytest.raises(ValueError, match="var_floor must be > 0"):
        ConvCaps(2, 2, var_floor=0.0)
    with pytest.raises(ValueError, match=r"input activations of shape \(batch, in_caps\) = \(1, 3\), got \(1, 4\)"):
        em_routing(np.zeros((1, 3, 2, 16)), np.zeros((1, 4)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"beta_a of shape \(out_caps,\) = \(2,\), got \(3,\)"):
        em_routing(np.zeros((1, 3, 2, 16)), np.zeros((1, 3)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="SpreadLoss expected labels of shape"):
        spread_loss(np.zeros((2, 3)), np.zeros(3, np.int64), 0.2)


# -- float64 parity with PyTorch --------------------------------------------------------------------------
@pytest.fixture
def torch_ref(torch):
    return torch, reference("torch_matrix_capsnet")


def _compare(pairs):
    for ours, theirs, what in pairs:
        np.testing.assert_allclose(host(ours), theirs.detach().numpy(), rtol=1e-8, atol=1e-11, err_msg=what)


@pytest.mark.parametrize("iterations,detach", [(1, False), (3, False), (3, True)])
def test_torch_parity_em_routing(torch_ref, host_rng, iterations, detach):
    torch, ref = torch_ref
    votes, a_in, beta_u, beta_a = routing_inputs(host_rng, b=3, i=8, j=4, p=16, spread=0.5)
    g_mean, g_a = host_rng.standard_normal((3, 4, 16)), host_rng.standard_normal((3, 4))
    with backend.use("numpy"):
        mean, a, state = em_routing(votes, a_in, beta_u, beta_a, iterations, 0.2, 1e-4)
        grads = em_routing_backward(g_mean, g_a, a_in, beta_u, state, detach)
    t_in = [torch.from_numpy(x).requires_grad_() for x in (votes, a_in, beta_u, beta_a)]
    t_mean, t_a = ref.em_routing(*t_in, iterations, 0.2, 1e-4, detach)
    ((t_mean * torch.from_numpy(g_mean)).sum() + (t_a * torch.from_numpy(g_a)).sum()).backward()
    _compare([(mean, t_mean, "mean"), (a, t_a, "activations")]
             + [(g, t.grad, f"gradient of {n}") for g, t, n in zip(grads, t_in, ("votes", "a_in", "beta_u", "beta_a"))])


def test_torch_parity_convcaps_classcaps_and_spread_loss(torch_ref, host_rng):
    """ConvCaps (stride 2) -> ConvCaps -> ClassCaps -> spread loss: outputs, loss and every gradient."""
    torch, ref = torch_ref
    with backend.use("numpy"):
        caps1 = ConvCaps(3, 4, 3, stride=2, iterations=3, inverse_temperature=0.1, dtype=F64, seed=0)
        caps2 = ConvCaps(4, 4, 2, stride=1, iterations=3, inverse_temperature=0.1, dtype=F64, seed=1)
        classes = ClassCaps(4, 5, iterations=3, inverse_temperature=0.1, dtype=F64, seed=2)
        for layer in (caps1, caps2, classes):
            layer.beta_u.data[...] = host_rng.standard_normal(layer.beta_u.shape) * 0.2
            layer.beta_a.data[...] = host_rng.standard_normal(layer.beta_a.shape) * 0.2
        poses = host_rng.standard_normal((2, 7, 7, 3, 4, 4)) * 0.5
        acts = host_rng.uniform(0.1, 0.9, (2, 7, 7, 3))
        labels = np.array([1, 4])
        crit = SpreadLoss(margin=0.7)
        p1, a1 = caps1(poses, acts)
        p2, a2 = caps2(p1, a1)
        p3, a3 = classes(p2, a2)
        loss = crit(a3, labels)
        g = classes.backward(None, crit.backward())
        g = caps2.backward(*g)
        g_poses, g_acts = caps1.backward(*g)

    t1 = ref.ConvCaps(3, 4, 3, 2, 3, 0.1).double()
    t2 = ref.ConvCaps(4, 4, 2, 1, 3, 0.1).double()
    t3 = ref.ClassCaps(4, 5, 3, 0.1).double()
    with torch.no_grad():
        for ours, theirs in ((caps1, t1), (caps2, t2), (classes, t3)):
            for name, p in ours.named_parameters():
                getattr(theirs, name).copy_(torch.from_numpy(p.data))
    tp = torch.from_numpy(poses).requires_grad_()
    ta = torch.from_numpy(acts).requires_grad_()
    q1, b1 = t1(tp, ta)
    q2, b2 = t2(q1, b1)
    q3, b3 = t3(q2, b2)
    t_loss = ref.spread_loss(b3, torch.from_numpy(labels), 0.7)
    t_loss.backward()
    assert 0 < float(loss) and a3.std() > 1e-3  # a loss that is not zero, activations that differ
    pairs = [(p1, q1, "ConvCaps poses"), (a1, b1, "ConvCaps activations"), (p3, q3, "class poses"),
             (a3, b3, "class activations"), (loss, t_loss, "spread loss"),
             (g_poses, tp.grad, "input pose gradient"), (g_acts, ta.grad, "input activation gradient")]
    for ours, theirs, name in ((caps1, t1, "caps1"), (caps2, t2, "caps2"), (classes, t3, "classes")):
        pairs += [(p.grad, getattr(theirs, n).grad, f"{name}.{n} gradient") for n, p in ours.named_parameters()]
    _compare(pairs)
