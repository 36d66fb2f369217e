"""EM routing (Hinton, Sabour and Frosst, "Matrix capsules with EM routing", ICLR 2018):
``em_routing`` / ``em_routing_backward``, ``matrix_votes``, ``MatrixPrimaryCaps``,
``ConvCaps``, ``ClassCaps`` and the spread loss.

A capsule is a 4x4 pose matrix M_i and an activation a_i. Child i votes for parent j with
V_ij = M_i W_ij (W_ij a learned 4x4 transform); the votes' 16 entries are the components h.
Routing fits one Gaussian per parent to the votes, iterating (Procedure 1 of the paper):

    M-step   r_ij <- R_ij a_i;   m_j = sum_i r_ij
             mu_jh = sum_i r_ij V_ijh / m_j
             var_jh = sum_i r_ij (V_ijh - mu_jh)^2 / m_j + var_floor
             cost_j = sum_h (beta_u + log sigma_jh) (J / I) m_j
             a_j = logistic(lambda_t (beta_a - cost_j))
    E-step   log p_ij = -1/2 sum_h (log var_jh + (V_ijh - mu_jh)^2 / var_jh)   (+ a constant)
             R_ij = softmax over j of (log a_j + log p_ij)

R starts uniform (1/J). The parent's pose is mu_j (as a 4x4 matrix), its activation a_j.

The pitfalls the public reimplementations met, and what is done here:

- **NaN past one iteration.** The E-step runs in log space: log a_j is log-sigmoid (no
  log 0) and R is a softmax over log-probabilities, so no Gaussian density underflows to
  0 / 0. The variance has a floor (``var_floor``, added to it) and the cost takes
  log sigma = 1/2 log var, the variance itself, never sqrt(var), whose gradient is infinite
  at 0. The mean divides by m_j + 1e-8, so a parent that receives no mass has mean 0 and
  the floor variance, not 0 / 0.
- **Inverse temperature.** lambda_t = lambda (t + 1) / T at iteration t of T: it grows to
  ``inverse_temperature`` at the last M-step, the one whose activations are the output.
  The default, 0.01, keeps the logistic out of saturation at initialisation (with 1.0 a
  fresh MNIST network's class activations are all 1 and pass no gradient).
- **A parent with a single child** (I = 1): mu = V, var = var_floor; finite, and tested.
- **Normalising the assigned mass.** cost_j is scaled by m_j J / I, the mass relative to an
  even share, so the same lambda fits a layer of 72 children and one of 288.

How it is computed. Routing reads the votes many times (two sums per M-step, one per E-step,
as many again backward) and does little arithmetic per read, so its speed is the layout:

- **Votes laid out once, parent-major.** The layers write them straight into the routing's
  layout (B, J, I, 16), one (rows, 16) x (16, 16) product per (child, parent) whose output
  rows are the parent-major votes (:func:`_votes_by_parent`), and centre them in place on
  each parent's plain mean c_j: U = V - c, and U2 = U^2 beside it (:func:`_centre`). No
  transposing copy: NumPy copies such a transposed array element by element, 3-6x slower
  than a contiguous copy. :func:`em_routing` (votes given in any layout) makes that one copy.
  The centre changes nothing in the result (mu = c + sum_i w U, the variance is
  shift-invariant); it keeps float32 from cancelling in E_w[U^2] - mu^2 and in the expanded
  Gaussian exponent below.
- **Every routing sum a batched product** over contiguous (I, 16) matrices, one per
  (group, parent): the M-step's sum_i w_ij U_ij and sum_i w_ij U2_ij are (1, I) x (I, 16);
  the E-step's sum_h (U_h - delta_h)^2 / var_h is U (-2 delta / var) + U2 (1 / var) +
  sum_h delta_h^2 / var_h, two (I, 16) x (16, 1) products. The weights r_ij / (m_j + 1e-8)
  sum to s_j = m_j / (m_j + 1e-8), not 1, and the equations keep s exactly:
  delta = mu - c = sum_i w U - (1 - s) c and var = sum_i w U2 - 2 delta sum_i w U + s delta^2
  (+ the floor; rounding below 0 is clipped to 0). Sums over the parents (the softmax) and
  over the children (the mass) are contiguous reductions of (B, J, I) arrays.
- **Backward in the same layout.** Each M-step's and E-step's part in the gradient of U and
  U2 is an outer product (w g_S, g_q coef); they are kept, small, and applied at the end as
  two batched products (B, J, I, n) x (B, J, n, 16), n = 2 T - 1. The layers read that
  gradient parent-major through the transposed per-(child, parent) products
  (:func:`_votes_by_parent_backward`); :func:`em_routing_backward` returns it in the votes'
  own layout (one copy). The state holds U, U2 and the per-iteration (B, J, I) and
  (B, J, 16) arrays, nothing else of the votes' size.
- **Evaluation in blocks.** With nothing kept for backward, the layers vote, centre and route
  the groups a block of about ``EVAL_BLOCK_BYTES`` (4 MB) of votes at a time, so the five
  reads of U and U2 (three M-steps, two E-steps) come from cache: at batch 100 the first
  ConvCaps' U and U2 are 184 MB, past any cache.

Shapes: votes (B, I, J, 16), input activations (B, I), beta_u and beta_a (J,); outputs
means (B, J, 16) and activations (B, J). Convolutional layers route every output position
as an independent group (the batch axis holds B * OH * OW groups): a child in two
overlapping windows is assigned separately in each, as in most public implementations.
Capsule maps are channels-last: poses (B, H, W, C, 4, 4), activations (B, H, W, C).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from capsnet import backend
from capsnet.layers.activation import sigmoid
from capsnet.layers.base import Module, as_rng, check_batch, check_input, conv_output_size, init_param
from capsnet.layers.capsule import check_labels
from capsnet.layers.conv import Conv2d, col2im, im2col

__all__ = [
    "ClassCaps",
    "ConvCaps",
    "EMState",
    "MatrixPrimaryCaps",
    "SpreadLoss",
    "em_routing",
    "em_routing_backward",
    "matrix_votes",
    "matrix_votes_backward",
    "spread_loss",
    "spread_loss_backward",
    "spread_margin",
]

POSE = 16  # entries of a 4x4 pose matrix
_MASS_EPS = 1e-8
# Evaluation routes the groups in blocks whose votes and squares take about this many bytes,
# so the five reads of each block (three M-steps, two E-steps) come from cache, not memory,
# but of at least EVAL_BLOCK_GROUPS groups: a block's votes are I x J products of that many
# rows, and with fewer the BLAS calls' overhead outweighs the cache (the paper's size, I = 288,
# J = 32, takes 1.2 MB a group).
EVAL_BLOCK_BYTES = 4 << 20
EVAL_BLOCK_GROUPS = 64


# -- EM routing --------------------------------------------------------------------------------
class EMState(NamedTuple):
    """What :func:`em_routing_backward` needs, in the parent-major layout of the module docstring.

    U, U2: the votes centred on their plain mean c_j, and their squares, each (B, J, I, P)
    contiguous; centre: c (B, J, P); shape: the votes' shape as given (the gradient comes
    back in it). For each iteration t: R[t] the assignments before the activation weighting
    (B, J, I); w[t] the weights r_ij / (m_j + 1e-8) (B, J, I); mass[t]: m_j (B, J); S[t]: the
    weighted sums (w U, w U2), each (B, J, P); mean[t], delta[t] = mean[t] - c, var[t]:
    (B, J, P); z[t]: the activations' logits (B, J); a[t]: activations (B, J); lam[t]: the
    inverse temperature.
    """

    U: Any
    U2: Any
    centre: Any
    shape: tuple
    R: list
    w: list
    mass: list
    S: list
    mean: list
    delta: list
    var: list
    z: list
    a: list
    lam: list


def _log_sigmoid(z: Any) -> Any:
    """log(logistic(z)) = min(z, 0) - log(1 + e^-|z|), finite for every finite z."""
    xp = backend.get_array_module(z)
    return xp.minimum(z, 0) - xp.log1p(xp.exp(-xp.abs(z)))


def _check_routing(votes: Any, a_in: Any, beta_u: Any, beta_a: Any, iterations: int) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"EM routing iterations must be an integer >= 1, got {iterations!r}")
    ndim = getattr(votes, "ndim", None)
    if ndim not in (4, 5) or (ndim == 5 and tuple(votes.shape[3:]) != (4, 4)):
        raise ValueError(f"em_routing expected votes of shape (batch, in_caps, out_caps, pose) or "
                         f"(batch, in_caps, out_caps, 4, 4), got {tuple(getattr(votes, 'shape', ()))}")
    check_batch("em_routing", tuple(votes.shape))
    b, i, j = votes.shape[:3]
    if tuple(a_in.shape) != (b, i):
        raise ValueError(f"em_routing expected input activations of shape (batch, in_caps) = {(b, i)}, "
                         f"got {tuple(a_in.shape)}")
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        if tuple(beta.shape) != (j,):
            raise ValueError(f"em_routing expected {name} of shape (out_caps,) = ({j},), got {tuple(beta.shape)}")


def _lay_out(votes: Any) -> tuple[Any, Any, Any]:
    """(U, U2, c): each parent's votes centred on their plain mean c_j (B, J, P), and their
    squares, each (B, J, I, P) contiguous. votes (B, I, J, P) or (B, I, J, 4, 4), any strides;
    cheapest child-major, as :func:`matrix_votes` gives them: then the centring is contiguous
    and one transposing copy lays U out. The layers skip this copy: they write their votes
    parent-major (:func:`_votes_by_parent`) and centre them in place (:func:`_centre`)."""
    xp = backend.get_array_module(votes)
    b, i, j = votes.shape[:3]
    p = votes.shape[3] if votes.ndim == 4 else POSE
    by_child = votes.transpose(1, 0, 2, *range(3, votes.ndim)).reshape(i, b, j, p)  # a view if child-major
    centre = by_child.sum(axis=0) * votes.dtype.type(1 / i)  # (B, J, P)
    U = xp.empty((b, j, i, p), dtype=votes.dtype)
    xp.subtract(by_child.transpose(1, 2, 0, 3), centre[:, :, None, :], out=U)  # centred as it is laid out
    return U, U * U, centre


def _centre(U: Any) -> tuple[Any, Any, Any]:
    """(U, U2, c) from parent-major votes U (B, J, I, P), contiguous, centred in place: the plain
    mean over the children c (B, J, P) is one batched product (1, I) x (I, P) (a reduction
    over the middle axis runs element by element, 20x slower here)."""
    xp = backend.get_array_module(U)
    i = U.shape[2]
    centre = xp.matmul(xp.full((1, i), 1 / i, dtype=U.dtype), U)[:, :, 0, :]  # (B, J, P)
    U -= centre[:, :, None, :]
    return U, U * U, centre


def _m_step(U: Any, U2: Any, centre: Any, R: Any, a_in: Any, beta_u: Any, beta_a: Any, lam: Any, share: Any,
            floor: Any) -> tuple:
    """One M-step (Procedure 1): (w, mass, S, mean, delta, var, log var, z, a); the sums over the
    children are two batched products, w U and w U2, (B, J, 1, I) x (B, J, I, P)."""
    xp = backend.get_array_module(U)
    dt = U.dtype.type
    p = centre.shape[2]
    w = R * a_in[:, None, :]  # r, made the weights w in place
    mass = w.sum(axis=2)  # (B, J)
    inv = 1 / (mass + dt(_MASS_EPS))
    w *= inv[:, :, None]
    S1 = xp.matmul(w[:, :, None, :], U)[:, :, 0, :]  # (B, J, P): sum_i w U
    S2 = xp.matmul(w[:, :, None, :], U2)[:, :, 0, :]  # sum_i w U^2
    # w sums to s = m / (m + 1e-8), not 1: mean = sum_i w V = c + delta, delta = S1 - (1 - s) c,
    # and sum_i w (V - mean)^2 = S2 - 2 delta S1 + s delta^2, exactly.
    delta = S1 - (dt(_MASS_EPS) * inv)[..., None] * centre
    raw = S2 - 2 * delta * S1 + (mass * inv)[..., None] * (delta * delta)
    var = xp.maximum(raw, 0) + floor  # rounding may leave raw a little below 0
    log_var = xp.log(var)
    cost = (beta_u * dt(p) + dt(0.5) * log_var.sum(axis=2)) * (mass * share)
    z = lam * (beta_a - cost)
    return w, mass, (S1, S2), centre + delta, delta, var, log_var, z, sigmoid(z)


def _e_step(U: Any, U2: Any, delta: Any, var: Any, log_var: Any, z: Any) -> Any:
    """One E-step: R (B, J, I), a softmax over the parents of log a_j + log p_ij, where
    -1/2 sum_h (U_ih - delta_h)^2 / var_h is two batched products, U (delta / var) +
    U2 (-1/2 / var), (B, J, I, P) x (B, J, P, 1), plus a constant per parent. The (B, J, I)
    arrays are worked on in place (the softmax too): one allocation, no temporaries."""
    xp = backend.get_array_module(U)
    dt = U.dtype.type
    inv_var = 1 / var
    logit = xp.matmul(U, (delta * inv_var)[..., None])[..., 0]  # (B, J, I)
    logit += xp.matmul(U2, (dt(-0.5) * inv_var)[..., None])[..., 0]
    const = (delta * delta * inv_var).sum(axis=2) + log_var.sum(axis=2)
    logit += (_log_sigmoid(z) - dt(0.5) * const)[:, :, None]
    logit -= logit.max(axis=1, keepdims=True)  # the softmax over the parents, in place
    xp.exp(logit, out=logit)
    logit *= 1 / logit.sum(axis=1, keepdims=True)
    return logit


def em_routing(votes: Any, a_in: Any, beta_u: Any, beta_a: Any, iterations: int = 3,
               inverse_temperature: float = 0.01, var_floor: float = 1e-4) -> tuple[Any, Any, EMState]:
    """EM routing for every group at once (see the module docstring for the equations).

    votes: (B, I, J, P) V_ij, or (B, I, J, 4, 4), any strides; a_in: (B, I) the children's
    activations; beta_u, beta_a: (J,). Returns (mean (B, J, P), activations (B, J), the state
    :func:`em_routing_backward` needs).
    """
    _check_routing(votes, a_in, beta_u, beta_a, iterations)
    backend.get_array_module(votes, a_in, beta_u, beta_a)
    U, U2, centre = _lay_out(votes)
    return _route(U, U2, centre, tuple(votes.shape), a_in, beta_u, beta_a, iterations, inverse_temperature,
                  var_floor)


def _route(U: Any, U2: Any, centre: Any, shape: tuple, a_in: Any, beta_u: Any, beta_a: Any, iterations: int,
           inverse_temperature: float, var_floor: float) -> tuple[Any, Any, EMState]:
    """:func:`em_routing` from votes already laid out (:func:`_lay_out` or :func:`_centre`);
    shape: the votes' shape as the caller gave them."""
    xp = backend.get_array_module(U, a_in, beta_u, beta_a)
    dt = U.dtype.type
    b, j, i = U.shape[:3]
    share, floor = dt(j / i), dt(var_floor)
    R = xp.full((b, j, i), 1.0 / j, dtype=U.dtype)
    state = EMState(U, U2, centre, shape, [], [], [], [], [], [], [], [], [], [])
    for t in range(iterations):
        lam = dt(inverse_temperature * (t + 1) / iterations)
        w, mass, S, mean, delta, var, log_var, z, a = _m_step(U, U2, centre, R, a_in, beta_u, beta_a, lam, share, floor)
        for store, value in zip(state[4:], (R, w, mass, S, mean, delta, var, z, a, lam)):
            store.append(value)
        if t < iterations - 1:
            R = _e_step(U, U2, delta, var, log_var, z)
    return mean, a, state


def _e_step_backward(g_R: Any, U: Any, U2: Any, R_next: Any, delta: Any, var: Any, z: Any) -> tuple:
    """Through the E-step R' = softmax_j(log a_j + log p_ij): (g_z, g_delta, g_var, g_q, coef),
    g_q (B, J, I) being the gradient of the quadratic form sum_h (U - delta)^2 / var, whose part
    in the votes is the outer products g_q coef, left for the end (see em_routing_backward)."""
    xp = backend.get_array_module(U)
    dt = U.dtype.type
    g_logit = R_next * (g_R - (R_next * g_R).sum(axis=1, keepdims=True))  # (B, J, I)
    total = g_logit.sum(axis=2)  # (B, J)
    g_z = total * sigmoid(-z)  # d log a / dz = 1 - a
    g_q = dt(-0.5) * g_logit
    g_c1 = xp.matmul(g_q[:, :, None, :], U)[:, :, 0, :]  # (B, J, P)
    g_c2 = xp.matmul(g_q[:, :, None, :], U2)[:, :, 0, :]
    inv_var = 1 / var
    g_const = (dt(-0.5) * total)[..., None]  # the constant sum_h delta^2 / var + sum_h log var
    g_delta = dt(-2) * g_c1 * inv_var + 2 * g_const * delta * inv_var
    g_var = (2 * g_c1 * delta - g_c2 - g_const * delta * delta) * (inv_var * inv_var) + g_const * inv_var
    return g_z, g_delta, g_var, g_q, (dt(-2) * delta * inv_var, inv_var)


def _m_step_backward(g_z: Any, g_delta: Any, g_var: Any, U: Any, U2: Any, centre: Any, w: Any, mass: Any, S: Any,
                     delta: Any, var: Any, beta_u: Any, lam: Any, share: Any) -> tuple:
    """Through one M-step: (g_r (B, J, I), (g_S1, g_S2) (B, J, P), g_beta_u, g_beta_a); their
    part in the votes is the outer products w g_S, left for the end."""
    xp = backend.get_array_module(U)
    dt = U.dtype.type
    half, p = dt(0.5), delta.shape[2]
    inv_var = 1 / var
    # a = logistic(z), z = lam (beta_a - cost), cost = (P beta_u + 1/2 sum_h log var) m J / I
    g_beta_a = lam * g_z.sum(axis=0)
    g_cost = -lam * g_z
    g_beta_u = dt(p) * (g_cost * mass * share).sum(axis=0)
    g_var = g_var + (half * g_cost * mass * share)[..., None] * inv_var
    g_mass = g_cost * share * (beta_u * dt(p) + half * xp.log(var).sum(axis=2))
    # var = max(S2 - 2 delta S1 + s delta^2, 0) + floor, delta = S1 - (1 - s) c, s = m / (m + eps)
    inv = 1 / (mass + dt(_MASS_EPS))
    s = (mass * inv)[..., None]
    S1, S2 = S
    raw = S2 - 2 * delta * S1 + s * (delta * delta)
    g_raw = g_var * (raw > 0)
    g_delta = g_delta + g_raw * (2 * s * delta - 2 * S1)
    g_S1 = g_delta - 2 * g_raw * delta  # delta's own S1 term included
    g_s = (g_raw * delta * delta + g_delta * centre).sum(axis=2)
    g_w = xp.matmul(U, g_S1[..., None])[..., 0]  # (B, J, I)
    g_w += xp.matmul(U2, g_raw[..., None])[..., 0]
    # w = r / (m + eps), m = sum_i r_ij; d s / dm = eps / (m + eps)^2
    g_mass = g_mass + g_s * dt(_MASS_EPS) * inv * inv - (g_w * w).sum(axis=2) * inv
    g_r = g_w * inv[..., None] + g_mass[..., None]
    return g_r, (g_S1, g_raw), g_beta_u, g_beta_a


def em_routing_backward(grad_mean: Any, grad_a: Any, a_in: Any, beta_u: Any, state: EMState,
                        detach: bool = False) -> tuple[Any, Any, Any, Any]:
    """Gradients of :func:`em_routing` w.r.t. (votes (in the shape they were given), a_in (B, I),
    beta_u (J,), beta_a (J,)).

    grad_mean: (B, J, P) and grad_a: (B, J); either may be None. The gradient flows through
    every iteration: through each M-step's mean, variance and cost, and through each E-step's
    assignments into the M-step before it. With ``detach=True`` it flows only through the last
    M-step, its assignments R held fixed. The gradient of (U, U2) is a sum of outer products,
    one per M-step (w g_S) and E-step (g_q coef); they are two batched products at the end,
    (B, J, I, n) x (B, J, n, P), the only arrays of the votes' size that the backward writes
    before the child-major copy it returns.
    """
    g_U, g_a_in, g_beta_u, g_beta_a = _route_backward(grad_mean, grad_a, a_in, beta_u, state, detach)
    b, j, i, p = g_U.shape
    xp = backend.get_array_module(g_U)
    by_child = xp.ascontiguousarray(g_U.transpose(2, 0, 1, 3))  # (I, B, J, P), as matrix_votes lays votes out
    if len(state.shape) == 5:
        return by_child.reshape(i, b, j, 4, 4).transpose(1, 0, 2, 3, 4), g_a_in, g_beta_u, g_beta_a
    return by_child.transpose(1, 0, 2, 3), g_a_in, g_beta_u, g_beta_a


def _route_backward(grad_mean: Any, grad_a: Any, a_in: Any, beta_u: Any, state: EMState,
                    detach: bool) -> tuple[Any, Any, Any, Any]:
    """:func:`em_routing_backward` with the votes' gradient left parent-major, (B, J, I, P)."""
    U, U2, centre = state.U, state.U2, state.centre
    xp = backend.get_array_module(U, a_in, beta_u)
    dt = U.dtype.type
    b, j, i, p = U.shape
    share = dt(j / i)
    g_a_in = xp.zeros_like(a_in)
    g_beta_u = xp.zeros_like(beta_u)
    g_beta_a = xp.zeros_like(beta_u)
    left, right = [], []  # the gradient of (U, U2): sum_n left[n] (B, J, I) outer right[n] (B, J, P) x 2
    g_R = None  # dL/d(the assignments the E-step after iteration t produced), (B, J, I)
    last = len(state.a) - 1
    for t in range(last, -1, -1):
        R, w, mass, S, mean, var = state.R[t], state.w[t], state.mass[t], state.S[t], state.mean[t], state.var[t]
        z, a, lam = state.z[t], state.a[t], state.lam[t]
        delta = state.delta[t]
        g_z = xp.zeros_like(z)
        g_delta = xp.zeros_like(mean)
        g_var = xp.zeros_like(var)
        if t == last:
            if grad_mean is not None:
                g_delta = g_delta + grad_mean
            if grad_a is not None:
                g_z = g_z + grad_a * a * sigmoid(-z)
        else:
            e_z, e_delta, e_var, g_q, coef = _e_step_backward(g_R, U, U2, state.R[t + 1], delta, var, z)
            g_z, g_delta, g_var = g_z + e_z, g_delta + e_delta, g_var + e_var
            left.append(g_q)
            right.append(coef)
        g_r, g_S, g_bu, g_ba = _m_step_backward(g_z, g_delta, g_var, U, U2, centre, w, mass, S, delta, var, beta_u,
                                               lam, share)
        left.append(w)
        right.append(g_S)
        g_beta_u += g_bu
        g_beta_a += g_ba
        g_a_in += (g_r * R).sum(axis=1)  # r = R a_in
        if detach or t == 0:
            break
        g_R = g_r * a_in[:, None, :]
    outer = xp.stack(left, axis=2).transpose(0, 1, 3, 2)  # (B, J, I, n), stacked in whole blocks
    g_U = xp.matmul(outer, xp.stack([r[0] for r in right], axis=2))  # (B, J, I, P)
    g_U2 = xp.matmul(outer, xp.stack([2 * r[1] for r in right], axis=2))  # U2 = U^2: d/dU is 2 U
    g_U2 *= U
    g_U += g_U2  # the centre is held constant: the result does not depend on it
    return g_U, g_a_in, g_beta_u, g_beta_a


# -- votes -------------------------------------------------------------------------------------------
def _block_transforms(w: Any) -> Any:
    """(I, 16, J * 16): for each child, the matrix that maps a flattened pose M_i to its J flattened
    votes M_i W_ij, kron(1_4, W_ij) side by side: entry ((r', k), (j, r, s)) is [r = r'] W_ijks."""
    xp = backend.get_array_module(w)
    i, j = w.shape[:2]
    blocks = xp.zeros((i, 4, 4, j, 4, 4), dtype=w.dtype)
    for r in range(4):  # the four rows of the pose matrix
        blocks[:, r, :, :, r, :] = w.transpose(0, 2, 1, 3)
    return blocks.reshape(i, POSE, j * POSE)


def matrix_votes(poses: Any, w: Any) -> Any:
    """V_ij = M_i W_ij: poses (N, I, 4, 4), w (I, J, 4, 4) -> votes (N, I, J, 4, 4).

    One batched product over the children i, (N, 16) x (16, J * 16) each, through
    :func:`_block_transforms`: four times the multiplications of a 4 x 4 product, but every
    vote's 16 entries come out side by side, child-major ((I, N, J, 16) in memory, returned
    as an (N, I, J, 4, 4) view), the layout :func:`em_routing` reads without a strided gather."""
    xp = backend.get_array_module(poses, w)
    n, i = poses.shape[:2]
    j = w.shape[1]
    rows = poses.transpose(1, 0, 2, 3).reshape(i, n, POSE)
    out = xp.matmul(rows, _block_transforms(w))  # (I, N, J * 16)
    return out.reshape(i, n, j, 4, 4).transpose(1, 0, 2, 3, 4)


def matrix_votes_backward(grad_votes: Any, poses: Any, w: Any) -> tuple[Any, Any]:
    """Gradients of :func:`matrix_votes` w.r.t. (poses, w); grad_votes (N, I, J, 4, 4), cheapest
    child-major as :func:`em_routing_backward` returns it."""
    xp = backend.get_array_module(grad_votes, poses, w)
    n, i = poses.shape[:2]
    j = w.shape[1]
    g = grad_votes.transpose(1, 0, 2, 3, 4).reshape(i, n, j * POSE)  # a view if child-major
    rows = poses.transpose(1, 0, 2, 3).reshape(i, n, POSE)
    grad_rows = xp.matmul(g, _block_transforms(w).transpose(0, 2, 1))  # (I, N, 16)
    blocks = xp.matmul(rows.transpose(0, 2, 1), g).reshape(i, 4, 4, j, 4, 4)  # d/d blocks
    grad_w = blocks[:, 0, :, :, 0, :] + blocks[:, 1, :, :, 1, :] + blocks[:, 2, :, :, 2, :] + blocks[:, 3, :, :, 3, :]
    return grad_rows.reshape(i, n, 4, 4).transpose(1, 0, 2, 3), grad_w.transpose(0, 2, 1, 3)


def _votes_by_parent(rows: Any, blocks: Any, out: Any) -> None:
    """Votes written straight into the routing's parent-major layout, one product (R, 16) x
    (16, 16) per (child, parent): rows (..., R, 16) the flattened poses and blocks (..., 16, 16)
    the transforms :func:`_block_transforms` makes (broadcast against each other), out a view of
    the parent-major votes whose matrices have contiguous rows, so no transposing copy follows.
    The products are small, but BLAS writes each vote's 64 bytes whole, where a transposing
    copy of child-major votes moves them element by element, 3-6x slower than a contiguous copy."""
    xp = backend.get_array_module(rows, blocks)
    xp.matmul(rows, blocks, out=out)


def _votes_by_parent_backward(g_out: Any, rows: Any, blocks: Any, parent_axis: int) -> tuple[Any, Any]:
    """Gradients of :func:`_votes_by_parent` w.r.t. (rows, blocks), g_out a view laid out as its
    ``out``: the rows' gradient summed over the parents (axis ``parent_axis`` of the products,
    a sum of whole contiguous blocks), the blocks' in the shape of the products' (..., 16, 16)."""
    xp = backend.get_array_module(g_out, rows, blocks)
    g_rows = xp.matmul(g_out, blocks.swapaxes(-1, -2)).sum(axis=parent_axis, keepdims=True)
    g_blocks = xp.matmul(rows.swapaxes(-1, -2), g_out)
    return g_rows, g_blocks


def _unblock(g_blocks: Any) -> Any:
    """The gradient of the transforms W (..., 4, 4) from that of their blocks (..., 16, 16),
    entry ((r, k), (r', s)) = [r = r'] W_ks: the sum of the four diagonal 4 x 4 blocks."""
    g = g_blocks.reshape(*g_blocks.shape[:-2], 4, 4, 4, 4)
    return g[..., 0, :, 0, :] + g[..., 1, :, 1, :] + g[..., 2, :, 2, :] + g[..., 3, :, 3, :]


# -- layers ---------------------------------------------------------------------------------------
def _check_routing_args(who: str, iterations: int, inverse_temperature: float, var_floor: float) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"{who} iterations must be an integer >= 1, got {iterations!r}")
    if not inverse_temperature > 0:
        raise ValueError(f"{who} inverse_temperature must be > 0, got {inverse_temperature!r}")
    if not var_floor > 0:
        raise ValueError(f"{who} var_floor must be > 0 (it keeps log var finite), got {var_floor!r}")


def _check_capsule_map(who: str, poses: Any, activations: Any, channels: int, dtype: Any) -> None:
    check_input(who, poses, (None, None, None, channels, 4, 4), dtype, "input poses")
    b, h, w = poses.shape[:3]
    check_input(who, activations, (b, h, w, channels), dtype, "input activations")


class _EMLayer(Module):
    """What ConvCaps and ClassCaps share: the routing settings and beta_u, beta_a."""

    def _routing_setup(self, who: str, out_caps: int, iterations: int, inverse_temperature: float,
                       var_floor: float, detach_routing: bool, dtype: Any) -> None:
        _check_routing_args(who, iterations, inverse_temperature, var_floor)
        self.iterations, self.inverse_temperature = iterations, inverse_temperature
        self.var_floor, self.detach_routing = var_floor, detach_routing
        self.beta_u = init_param((out_caps,), 0.0, dtype, None, "zeros")
        self.beta_a = init_param((out_caps,), 0.0, dtype, None, "zeros")

    def _route(self, votes: Any, a_in: Any) -> tuple[Any, Any, EMState]:
        """Routing of parent-major votes (B, J, I, 16), contiguous, centred here in place."""
        U, U2, centre = _centre(votes)
        b, j, i, p = votes.shape
        return _route(U, U2, centre, (b, i, j, p), a_in, self.beta_u.data, self.beta_a.data, self.iterations,
                      self.inverse_temperature, self.var_floor)

    def _route_blocks(self, votes_of: Any, n: int, i: int, a_in: Any, xp: Any, dtype: Any) -> tuple:
        """(means (N, J, 16), activations (N, J), the state or None): in training mode one
        call of ``votes_of(0, N)`` (parent-major votes (N, J, I, 16) of groups [0, N)) routed
        whole, its state kept for backward; in evaluation mode, nothing being kept, the groups
        in blocks of about EVAL_BLOCK_BYTES of votes (EVAL_BLOCK_GROUPS at least), each voted, centred and routed while in
        cache (a block of groups, never one example at a time)."""
        if self.training:
            return self._route(votes_of(0, n), a_in)
        j = self.beta_u.shape[0]
        step = max(1, EVAL_BLOCK_GROUPS, EVAL_BLOCK_BYTES // (2 * j * i * POSE * dtype.itemsize))
        if step >= n:
            mean, a, _ = self._route(votes_of(0, n), a_in)
            return mean, a, None
        mean, a = xp.empty((n, j, POSE), dtype=dtype), xp.empty((n, j), dtype=dtype)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            mean[lo:hi], a[lo:hi], _ = self._route(votes_of(lo, hi), a_in[lo:hi])
        return mean, a, None

    def _route_backward(self, g_mean: Any, g_a: Any, a_in: Any, state: EMState) -> tuple[Any, Any]:
        """(the votes' gradient, parent-major (B, J, I, 16), the input activations' gradient)."""
        g_votes, g_a_in, g_bu, g_ba = _route_backward(g_mean, g_a, a_in, self.beta_u.data, state,
                                                      self.detach_routing)
        self.beta_u.grad += g_bu
        self.beta_a.grad += g_ba
        return g_votes, g_a_in


class ConvCaps(_EMLayer):
    """Convolutional capsules with EM routing: a K x K x in_caps window of children votes for
    the out_caps parents at each output position.

    forward(poses (B, H, W, in_caps, 4, 4), activations (B, H, W, in_caps)) ->
    (poses (B, OH, OW, out_caps, 4, 4), activations (B, OH, OW, out_caps)), no padding;
    backward(grad_poses, grad_activations) -> (grad_poses, grad_activations), either
    incoming gradient may be None. Transforms W: (K, K, in_caps, out_caps, 4, 4), normal
    with std 1/2 (a vote entry sums 4 products, so votes keep the poses' scale);
    beta_u, beta_a: (out_caps,), zeros.
    """

    def __init__(self, in_caps: int = 8, out_caps: int = 16, kernel_size: int = 3, stride: int = 1,
                 iterations: int = 3, *, inverse_temperature: float = 0.01, var_floor: float = 1e-4,
                 detach_routing: bool = False, init_std: float = 0.5, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("out_caps", out_caps), ("kernel_size", kernel_size),
                            ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConvCaps {name} must be an integer >= 1, got {value!r}")
        self.in_caps, self.out_caps, self.kernel_size, self.stride = in_caps, out_caps, kernel_size, stride
        self.weight = init_param((kernel_size, kernel_size, in_caps, out_caps, 4, 4), init_std, dtype,
                                 as_rng(seed), "normal")
        self._routing_setup("ConvCaps", out_caps, iterations, inverse_temperature, var_floor, detach_routing, dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_caps}, {self.out_caps}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"iterations={self.iterations}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        k, s = self.kernel_size, self.stride
        return conv_output_size(height, k, s, 0), conv_output_size(width, k, s, 0)

    def forward(self, poses: Any, activations: Any) -> tuple[Any, Any]:
        _check_capsule_map("ConvCaps", poses, activations, self.in_caps, self.weight.dtype)
        xp = backend.get_array_module(poses, activations, self.weight.data)
        b, h, w = poses.shape[:3]
        oh, ow = self.output_size(h, w)
        k, c, d = self.kernel_size, self.in_caps, self.out_caps
        pose_map = xp.ascontiguousarray(poses).reshape(b, h, w, c * POSE)
        patches = im2col(pose_map, k, k, self.stride).reshape(-1, k * k * c, POSE)  # (N, I, 16), i = (ky, kx, c)
        a_in = im2col(xp.ascontiguousarray(activations), k, k, self.stride)  # (N, I)
        n, i = patches.shape[:2]
        rows, blocks = self._operands(patches)

        def votes_of(lo: int, hi: int) -> Any:
            votes = xp.empty((hi - lo, d, i, POSE), dtype=patches.dtype)
            _votes_by_parent(rows[:, :, lo:hi], blocks, votes.transpose(2, 1, 0, 3))  # (I, J, N, 16) products
            return votes

        mean, a, state = self._route_blocks(votes_of, n, i, a_in, xp, patches.dtype)
        self._save(patches, a_in, state, (b, h, w))
        return mean.reshape(b, oh, ow, d, 4, 4), a.reshape(b, oh, ow, d)

    def _operands(self, patches: Any) -> tuple[Any, Any]:
        """The votes' products: rows (I, 1, N, 16), views of the patches, and blocks (I, J, 16, 16)."""
        i, d = patches.shape[1], self.out_caps
        blocks = _block_transforms(self.weight.data.reshape(i, d, 4, 4)).reshape(i, POSE, d, POSE)
        return patches.transpose(1, 0, 2)[:, None], blocks.transpose(0, 2, 1, 3)

    def backward(self, grad_poses: Any, grad_activations: Any = None) -> tuple[Any, Any]:
        patches, a_in, state, (b, h, w) = self._pop()
        n, d = a_in.shape[0], self.out_caps
        k, c = self.kernel_size, self.in_caps
        g_mean = None if grad_poses is None else grad_poses.reshape(n, d, POSE)
        g_a = None if grad_activations is None else grad_activations.reshape(n, d)
        g_votes, g_a_in = self._route_backward(g_mean, g_a, a_in, state)  # (N, J, I, 16)
        rows, blocks = self._operands(patches)
        g_rows, g_blocks = _votes_by_parent_backward(g_votes.transpose(2, 1, 0, 3), rows, blocks, 1)
        self.weight.grad += _unblock(g_blocks).reshape(self.weight.shape)
        g_poses = col2im(g_rows[:, 0].transpose(1, 0, 2).reshape(n, -1), (b, h, w, c * POSE), k, k, self.stride)
        g_act = col2im(g_a_in, (b, h, w, c), k, k, self.stride)
        return g_poses.reshape(b, h, w, c, 4, 4), g_act


class ClassCaps(_EMLayer):
    """Class capsules with EM routing and coordinate addition: every capsule of the map votes
    for every class through the transform of its type, shared across positions, and the
    scaled centre of its position ((y + 1/2) / H, (x + 1/2) / W) is added to the first two
    entries of its vote's right-hand column.

    forward(poses (B, H, W, in_caps, 4, 4), activations (B, H, W, in_caps)) ->
    (poses (B, n_classes, 4, 4), activations (B, n_classes)), the activations being the
    class scores; backward(grad_poses, grad_activations) as for :class:`ConvCaps`.
    W: (in_caps, n_classes, 4, 4), normal with std 1/2; beta_u, beta_a: (n_classes,).
    """

    def __init__(self, in_caps: int = 16, n_classes: int = 10, iterations: int = 3, *,
                 coordinate_addition: bool = True, inverse_temperature: float = 0.01, var_floor: float = 1e-4,
                 detach_routing: bool = False, init_std: float = 0.5, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("n_classes", n_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassCaps {name} must be an integer >= 1, got {value!r}")
        self.in_caps, self.n_classes, self.coordinate_addition = in_caps, n_classes, coordinate_addition
        self.weight = init_param((in_caps, n_classes, 4, 4), init_std, dtype, as_rng(seed), "normal")
        self._routing_setup("ClassCaps", n_classes, iterations, inverse_temperature, var_floor, detach_routing,
                            dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_caps}, n_classes={self.n_classes}, iterations={self.iterations}, "
                f"coordinate_addition={self.coordinate_addition}")

    @staticmethod
    def _coordinates(h: int, w: int, xp: Any, dtype: Any) -> tuple[Any, Any]:
        """The scaled centres (y + 1/2) / H (H,) and (x + 1/2) / W (W,), added to the votes'
        entries (0, 3) and (1, 3)."""
        dt = dtype.type
        return (xp.arange(h, dtype=dtype) + dt(0.5)) * dt(1 / h), (xp.arange(w, dtype=dtype) + dt(0.5)) * dt(1 / w)

    def forward(self, poses: Any, activations: Any) -> tuple[Any, Any]:
        _check_capsule_map("ClassCaps", poses, activations, self.in_caps, self.weight.dtype)
        xp = backend.get_array_module(poses, activations, self.weight.data)
        b, h, w, c = poses.shape[:4]
        k = self.n_classes
        poses = xp.ascontiguousarray(poses)
        rows, blocks = self._operands(poses)
        rows_at, cols_at = self._coordinates(h, w, xp, poses.dtype)

        def votes_of(lo: int, hi: int) -> Any:
            # Children ordered (type, position); the products are (C, K, H * W) of (B, 16) x (16, 16).
            votes = xp.empty((hi - lo, k, c * h * w, POSE), dtype=poses.dtype)
            _votes_by_parent(rows[..., lo:hi, :], blocks, self._by_product(votes, c, h * w))
            if self.coordinate_addition:
                by_place = votes.reshape(hi - lo, k, c, h, w, POSE)
                by_place[..., 3] += rows_at[:, None]
                by_place[..., 7] += cols_at
            return votes

        a_in = xp.ascontiguousarray(activations.transpose(0, 3, 1, 2)).reshape(b, c * h * w)
        mean, a, state = self._route_blocks(votes_of, b, c * h * w, a_in, xp, poses.dtype)
        self._save(poses, a_in, state, (b, h, w))
        return mean.reshape(b, k, 4, 4), a

    def _operands(self, poses: Any) -> tuple[Any, Any]:
        """The votes' products: rows (C, 1, H * W, B, 16), views of the poses, and blocks
        (C, K, 1, 16, 16)."""
        b, h, w, c = poses.shape[:4]
        blocks = _block_transforms(self.weight.data).reshape(c, POSE, self.n_classes, POSE)
        rows = poses.reshape(b, h * w, c, POSE).transpose(2, 1, 0, 3)[:, None]
        return rows, blocks.transpose(0, 2, 1, 3)[:, :, None]

    @staticmethod
    def _by_product(votes: Any, c: int, places: int) -> Any:
        """Parent-major votes (B, K, C * H * W, 16) as the products' (C, K, H * W, B, 16) view."""
        b, k = votes.shape[:2]
        return votes.reshape(b, k, c, places, POSE).transpose(2, 1, 3, 0, 4)

    def backward(self, grad_poses: Any, grad_activations: Any = None) -> tuple[Any, Any]:
        poses, a_in, state, (b, h, w) = self._pop()
        c, k = self.in_caps, self.n_classes
        g_mean = None if grad_poses is None else grad_poses.reshape(b, k, POSE)
        g_votes, g_a_in = self._route_backward(g_mean, grad_activations, a_in, state)  # (B, K, I, 16)
        rows, blocks = self._operands(poses)
        g_rows, g_blocks = _votes_by_parent_backward(self._by_product(g_votes, c, h * w), rows, blocks, 1)
        self.weight.grad += _unblock(g_blocks.sum(axis=2))
        g_poses = g_rows[:, 0].transpose(2, 1, 0, 3).reshape(b, h, w, c, 4, 4)
        return g_poses, g_a_in.reshape(b, c, h, w).transpose(0, 2, 3, 1)


class MatrixPrimaryCaps(Module):
    """Primary matrix capsules: a 1x1 convolution from ``in_channels`` maps to ``n_types`` 4x4
    poses (linear) and ``n_types`` activations (logistic) at every position.

    forward(x (B, in_channels, H, W)) -> (poses (B, H, W, n_types, 4, 4), activations
    (B, H, W, n_types)); backward(grad_poses, grad_activations) -> (B, in_channels, H, W).
    Channels [16 t, 16 t + 16) are type t's pose, channel 16 n_types + t its activation's logit.
    """

    def __init__(self, in_channels: int = 32, n_types: int = 8, *, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        self.n_types = n_types
        self.conv = Conv2d(in_channels, n_types * (POSE + 1), 1, dtype=dtype, seed=seed)

    def extra_repr(self) -> str:
        return f"{self.conv.in_channels}, n_types={self.n_types}"

    def forward(self, x: Any) -> tuple[Any, Any]:
        check_input("MatrixPrimaryCaps", x, (None, self.conv.in_channels, None, None), self.conv.weight.dtype)
        xp = backend.get_array_module(x, self.conv.weight.data)
        y = self.conv.forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        b, h, w, _ = y.shape
        split = self.n_types * POSE
        a = sigmoid(y[..., split:])
        self._save(a)
        return y[..., :split].reshape(b, h, w, self.n_types, 4, 4), a

    def backward(self, grad_poses: Any, grad_activations: Any = None) -> Any:
        (a,) = self._pop()
        xp = backend.get_array_module(a)
        b, h, w, t = a.shape
        g = xp.zeros((b, h, w, t * (POSE + 1)), dtype=a.dtype)
        if grad_poses is not None:
            g[..., : t * POSE] = grad_poses.reshape(b, h, w, t * POSE)
        if grad_activations is not None:
            g[..., t * POSE:] = grad_activations * a * (1 - a)
        gx = self.conv.backward_nhwc(g)
        return None if gx is None else gx.transpose(0, 3, 1, 2)


# -- the spread loss --------------------------------------------------------------------------------
def _spread_terms(a: Any, labels: Any, margin: float) -> tuple[Any, Any]:
    """The one-hot targets and max(0, m - (a_t - a_i)) for the wrong classes (0 at i = t)."""
    xp = backend.get_array_module(a)
    if getattr(a, "ndim", None) != 2:
        raise ValueError(f"spread loss expected activations of shape (batch, n_classes), "
                         f"got {tuple(getattr(a, 'shape', ()))}")
    b, k = a.shape
    check_batch("SpreadLoss", tuple(a.shape))
    check_labels("SpreadLoss", labels, b, k)
    backend.get_array_module(a, labels)
    target = (xp.arange(k)[None, :] == labels[:, None]).astype(a.dtype)
    a_t = (a * target).sum(axis=1, keepdims=True)
    gap = xp.maximum(a.dtype.type(margin) - (a_t - a), 0) * (1 - target)
    return target, gap


def spread_loss(a: Any, labels: Any, margin: float) -> Any:
    """L = sum_{i != t} max(0, m - (a_t - a_i))^2, averaged over the batch (section 3 of the
    paper). a: (B, K) class activations, labels: (B,) the targets t; a 0-d array."""
    _, gap = _spread_terms(a, labels, margin)
    return (gap * gap).sum(axis=1).mean()


def spread_loss_backward(a: Any, labels: Any, margin: float, grad_out: Any = 1.0) -> Any:
    """Gradient of :func:`spread_loss` w.r.t. a, (B, K)."""
    target, gap = _spread_terms(a, labels, margin)
    g = 2 * gap
    g = g - target * g.sum(axis=1, keepdims=True)
    return g * (grad_out / a.shape[0])


def spread_margin(progress: float, start: float = 0.2, end: float = 0.9) -> float:
    """The margin after a fraction ``progress`` in [0, 1] of training: linear from 0.2 to 0.9."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


class SpreadLoss(Module):
    """Spread loss. forward(a (B, K), labels (B,)) -> scalar; backward(grad=1) -> (B, K).

    ``margin`` starts at 0.2; a training loop raises it with :meth:`set_progress` (to 0.9 at
    the end, :func:`spread_margin`)."""

    def __init__(self, margin: float = 0.2, start: float = 0.2, end: float = 0.9):
        super().__init__()
        if not 0 < start <= end:
            raise ValueError(f"SpreadLoss needs 0 < start <= end, got start={start}, end={end}")
        self.margin, self.start, self.end = margin, start, end

    def extra_repr(self) -> str:
        return f"margin={self.margin}, start={self.start}, end={self.end}"

    def set_progress(self, progress: float) -> None:
        """Set the margin for a fraction ``progress`` of training done."""
        self.margin = spread_margin(progress, self.start, self.end)

    def forward(self, a: Any, labels: Any) -> Any:
        loss = spread_loss(a, labels, self.margin)
        self._save(a, labels, self.margin)
        return loss

    def backward(self, grad_out: Any = 1.0) -> Any:
        a, labels, margin = self._pop()
        return spread_loss_backward(a, labels, margin, grad_out)
