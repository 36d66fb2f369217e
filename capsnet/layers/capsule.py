"""Capsule layers: squash, PrimaryCaps, DigitCaps with dynamic routing, lengths, masking
(and the choice of the longest capsules it makes at test time).

Notation follows Sabour, Frosst and Hinton (2017): input capsules u_i, predictions
u_hat_{j|i} = W_ij u_i, routing logits b_ij, coupling coefficients c_ij, total
input s_j and output capsules v_j. Capsules are (batch, n_caps, dim) arrays.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from capsnet import backend, checks
from capsnet.layers.base import Module, as_rng, check_batch, check_input, init_param
from capsnet.layers.base import conv_output_size
from capsnet.layers.conv import Conv2d


# -- squash (eq. 1) ---------------------------------------------------------
# Each step of squash and its gradient is one element-wise pass, or one pass and a sum
# over the capsule's components: on CuPy each function below is one kernel
# (capsnet.backend.fused), on NumPy the same operations in the same order.
def _squared_norm_kernel(xp: Any) -> Any:
    def squared_norm(s):
        return xp.sum(s * s, axis=-1)
    return squared_norm


def _squash_scale_kernel(xp: Any) -> Any:
    def squash_scale(s, n2):
        return s * (xp.sqrt(n2) / (1 + n2))
    return squash_scale


def _radial_kernel(xp: Any) -> Any:
    def radial(s, g, n2):
        n = xp.sqrt(n2)
        return xp.sum(s / xp.where(n > 0, n, 1) * g, axis=-1)
    return radial


def _squash_grad_kernel(xp: Any) -> Any:
    def squash_grad(s, g, n2, radial):
        n = xp.sqrt(n2)
        one_n2 = 1 + n2
        return g * (n / one_n2) + s / xp.where(n > 0, n, 1) * (radial * n * (1 - n2) / (one_n2 * one_n2))
    return squash_grad


_squared_norm = backend.fused(_squared_norm_kernel)
_squash_scale = backend.fused(_squash_scale_kernel)
_radial = backend.fused(_radial_kernel)
_squash_grad = backend.fused(_squash_grad_kernel)


def squash(s: Any, axis: int = -1) -> Any:
    """v = |s|^2 / (1 + |s|^2) * s / |s| (eq. 1), along ``axis``; 0 at s = 0.

    |s|^2 is formed directly, so |s| must stay below about 1.8e19 in float32
    (1.3e154 in float64); capsule inputs are many orders of magnitude smaller.
    """
    if axis not in (-1, s.ndim - 1):
        return squash(s.swapaxes(axis, -1)).swapaxes(axis, -1)
    n2 = _squared_norm(s)[..., None]
    return _squash_scale(s, n2)


def squash_backward(grad_out: Any, s: Any, axis: int = -1) -> Any:
    """Gradient of :func:`squash` w.r.t. s.

    With n = |s| and f(n) = n / (1 + n^2), v = f(n) s and
    dL/ds = f g + f'(n) n s_hat (s_hat . g), f'(n) = (1 - n^2) / (1 + n^2)^2.
    Written with the unit vector s_hat so it stays finite (and exactly 0) at s = 0.
    """
    backend.get_array_module(s, grad_out)  # refuses mixed devices
    if axis not in (-1, s.ndim - 1):
        return squash_backward(grad_out.swapaxes(axis, -1), s.swapaxes(axis, -1)).swapaxes(axis, -1)
    n2 = _squared_norm(s)[..., None]
    radial = _radial(s, grad_out, n2)[..., None]
    return _squash_grad(s, grad_out, n2, radial)


class Squash(Module):
    """Squash along the last axis: (..., dim) -> (..., dim)."""

    def forward(self, s: Any) -> Any:
        self._save(s)
        return squash(s)

    def backward(self, grad_out: Any) -> Any:
        (s,) = self._pop()
        return squash_backward(grad_out, s)


# -- capsule lengths --------------------------------------------------------
def capsule_length(v: Any) -> Any:
    """|v_j| over the last axis: (B, J, D) -> (B, J)."""
    xp = backend.get_array_module(v)
    return xp.sqrt((v * v).sum(axis=-1))


def capsule_length_backward(grad_out: Any, v: Any, length: Any) -> Any:
    """Gradient of :func:`capsule_length`; 0 (a subgradient) for a zero vector."""
    xp = backend.get_array_module(v)
    return v * (grad_out / xp.where(length > 0, length, 1))[..., None]


class CapsuleLength(Module):
    """(B, J, D) capsules -> (B, J) lengths, the class probabilities."""

    def forward(self, v: Any) -> Any:
        length = capsule_length(v)
        self._save(v, length)
        return length

    def backward(self, grad_out: Any) -> Any:
        v, length = self._pop()
        return capsule_length_backward(grad_out, v, length)


# -- PrimaryCaps ------------------------------------------------------------
class PrimaryCaps(Module):
    """Convolutional capsules: a Conv2d with n_types * dim channels, regrouped into
    capsules and squashed.

    Input (B, in_channels, H, W) -> (B, n_types * OH * OW, dim); capsule index
    i = type * OH * OW + y * OW + x and channel type * dim + d holds component d.
    Default: 32 types of 8D from 256 channels, 9x9 kernel, stride 2 (1152 capsules
    on a 20x20 input).
    """

    def __init__(self, in_channels: int = 256, n_types: int = 32, dim: int = 8, kernel_size: int = 9,
                 stride: int = 2, *, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        self.n_types, self.dim = n_types, dim
        self.conv = Conv2d(in_channels, n_types * dim, kernel_size, stride, dtype=dtype, seed=seed)

    def extra_repr(self) -> str:
        return f"{self.conv.in_channels}, n_types={self.n_types}, dim={self.dim}"

    def n_capsules(self, height: int, width: int) -> int:
        """How many capsules an input of height x width gives."""
        k, st = self.conv.kernel_size, self.conv.stride
        return self.n_types * conv_output_size(height, k, st, 0) * conv_output_size(width, k, st, 0)

    def forward_nhwc(self, x_nhwc: Any) -> Any:
        """Channels-last input (B, H, W, C) -> capsules (B, n_caps, dim)."""
        y = self.conv.forward_nhwc(x_nhwc)
        b, oh, ow, _ = y.shape
        s = y.reshape(b, oh, ow, self.n_types, self.dim).transpose(0, 3, 1, 2, 4).reshape(b, -1, self.dim)
        self._save(s, (b, oh, ow))
        return squash(s)

    def backward_nhwc(self, grad_out: Any) -> Any:
        s, (b, oh, ow) = self._pop()
        gs = squash_backward(grad_out, s)
        gy = gs.reshape(b, self.n_types, oh, ow, self.dim).transpose(0, 2, 3, 1, 4)
        xp = backend.get_array_module(gy)
        return self.conv.backward_nhwc(xp.ascontiguousarray(gy).reshape(b, oh, ow, -1))

    def forward(self, x: Any) -> Any:
        check_input("PrimaryCaps", x, (None, self.conv.in_channels, None, None), self.conv.weight.dtype)
        xp = backend.get_array_module(x, self.conv.weight.data)
        return self.forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)))

    def backward(self, grad_out: Any) -> Any:
        gx = self.backward_nhwc(grad_out)
        return None if gx is None else gx.transpose(0, 3, 1, 2)


# -- dynamic routing (Procedure 1) ------------------------------------------
def softmax(x: Any, axis: int) -> Any:
    """exp(x) / sum exp(x) along ``axis``, with the maximum taken out first (eq. 3's softmax)."""
    xp = backend.get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class RoutingState(NamedTuple):
    """What the backward pass needs from each routing iteration r.

    c[r]: coupling coefficients (B, J, I); s[r]: total input (B, J, D); v[r]: output (B, J, D).
    """

    c: list
    s: list
    v: list


def _by_output(u_hat: Any) -> Any:
    # (B, I, J, D) -> a (B, J, I, D) view: each (b, j) block is an I x D matrix with
    # unit stride along D, so matmul runs it through BLAS without a copy.
    return u_hat.transpose(0, 2, 1, 3)


def dynamic_routing(u_hat: Any, iterations: int = 3) -> tuple[Any, RoutingState]:
    """Routing by agreement (Procedure 1), for every example at once.

    u_hat: (B, I, J, D) predictions u_hat_{j|i}. Logits b_ij start at 0 for each
    example; c_i = softmax over the output capsules j (eq. 3); s_j = sum_i c_ij
    u_hat_{j|i} (eq. 2); v_j = squash(s_j); b_ij += u_hat_{j|i} . v_j.
    Returns v: (B, J, D) and the state :func:`dynamic_routing_backward` needs.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"routing iterations must be an integer >= 1, got {iterations!r}")
    xp = backend.get_array_module(u_hat)
    b, i, j, _ = u_hat.shape
    U = _by_output(u_hat)
    logits = None
    state = RoutingState([], [], [])
    for r in range(iterations):
        if logits is None:
            c = xp.full((b, j, i), 1.0 / j, dtype=u_hat.dtype)
            s = u_hat.sum(axis=1) * u_hat.dtype.type(1.0 / j)  # uniform c: one reduction, no products
        else:
            c = softmax(logits, axis=1)
            s = xp.matmul(c[:, :, None, :], U)[:, :, 0, :]
        v = squash(s)
        state.c.append(c)
        state.s.append(s)
        state.v.append(v)
        if r < iterations - 1:
            agreement = xp.matmul(U, v[..., None])[..., 0]
            logits = agreement if logits is None else logits + agreement
    return v, state


def dynamic_routing_backward(grad_v: Any, u_hat: Any, state: RoutingState, detach: bool = False,
                             out: Any = None) -> Any:
    """Gradient of :func:`dynamic_routing` w.r.t. u_hat, (B, I, J, D).

    ``out``, an array laid out like u_hat, receives the gradient; it may be u_hat
    itself (read only before the gradient is written), which saves an array of
    u_hat's size when nothing else needs u_hat afterwards (on NumPy; CuPy computes
    a strided ``out`` into a temporary and copies).

    The gradient flows through every iteration: through s_j = sum_i c_ij u_hat
    and through the logit updates b_ij += u_hat . v_j that set later c_ij. With
    ``detach=True`` it flows only through the last s_j with its c_ij held fixed
    (the "stop gradient" variant of some implementations).
    """
    xp = backend.get_array_module(u_hat, grad_v)
    U = _by_output(u_hat)
    last = len(state.c) - 1
    # dL/du_hat is a sum of outer products (c_ij gs_j and g_next_ij v_j per
    # iteration): collect the factors, then form it with one batched matmul.
    left, right = [], []
    g_next = None  # dL/d(logits after iteration r's update)
    for r in range(last, -1, -1):
        c, s, v = state.c[r], state.s[r], state.v[r]
        gv = grad_v if r == last else None
        if g_next is not None:
            through_logits = xp.matmul(g_next[:, :, None, :], U)[:, :, 0, :]
            gv = through_logits if gv is None else gv + through_logits
            left.append(g_next)
            right.append(v)
        gs = squash_backward(gv, s)
        left.append(c)
        right.append(gs)
        if detach or r == 0:
            break
        gc = xp.matmul(U, gs[..., None])[..., 0]
        g_logits = c * (gc - (c * gc).sum(axis=1, keepdims=True))
        g_next = g_logits if g_next is None else g_next + g_logits
    grad = xp.empty_like(u_hat) if out is None else out
    xp.matmul(xp.stack(left, axis=-1), xp.stack(right, axis=-2), out=_by_output(grad))
    return grad


# -- DigitCaps ---------------------------------------------------------------
def capsule_predictions(u: Any, w: Any, out: Any = None) -> Any:
    """u_hat_{j|i} = W_ij u_i. u: (B, I, Din), w: (I, J, Dout, Din) -> (B, I, J, Dout).

    The result is a view of an (I, B, J, Dout) array: one matmul per input capsule.
    ``out``, an earlier result of the same shape and dtype, is overwritten instead
    of allocating a new one.
    """
    xp = backend.get_array_module(u, w)
    i, j, dout, din = w.shape
    store = None if out is None else out.transpose(1, 0, 2, 3).reshape(i, -1, j * dout)
    pred = xp.matmul(u.transpose(1, 0, 2), w.reshape(i, j * dout, din).transpose(0, 2, 1), out=store)
    return pred.reshape(i, -1, j, dout).transpose(1, 0, 2, 3)


def capsule_predictions_backward(grad_u_hat: Any, u: Any, w: Any) -> tuple[Any, Any]:
    """Gradients of :func:`capsule_predictions` w.r.t. (u, w)."""
    xp = backend.get_array_module(grad_u_hat, u, w)
    i, j, dout, din = w.shape
    g = grad_u_hat.transpose(1, 0, 2, 3).reshape(i, -1, j * dout)  # (I, B, J*Dout)
    grad_w = xp.matmul(g.transpose(0, 2, 1), u.transpose(1, 0, 2)).reshape(w.shape)
    grad_u = xp.matmul(g, w.reshape(i, j * dout, din)).transpose(1, 0, 2)
    return grad_u, grad_w


class DigitCaps(Module):
    """Fully connected capsules with dynamic routing.

    Input (B, in_caps, in_dim) -> output (B, out_caps, out_dim). Weights W: (in_caps,
    out_caps, out_dim, in_dim), normal with std ``init_std`` (default 0.01). The
    scale decides whether training starts. With Adam, 0.01 starts every |v_j| near 0
    and the lengths grow within the first steps; a scale that starts |s_j| near 1
    (about 0.15 for the paper's model) saturates every capsule within ten steps and
    training collapses onto one class. With plain SGD a scale as small as 1e-4
    starves the layers below of gradient (squash is flat at 0).
    """

    def __init__(self, in_caps: int = 1152, in_dim: int = 8, out_caps: int = 10, out_dim: int = 16,
                 iterations: int = 3, *, detach_routing: bool = False, init_std: float | None = None,
                 dtype: Any = "float32", seed: Any = None):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps),
                            ("out_dim", out_dim), ("iterations", iterations)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DigitCaps {name} must be an integer >= 1, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.detach_routing = iterations, detach_routing
        if init_std is None:
            init_std = DEFAULT_DIGITCAPS_STD
        self.init_std = init_std
        self.weight = init_param((in_caps, out_caps, out_dim, in_dim), init_std, dtype, as_rng(seed), "normal")

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}")

    def forward(self, u: Any) -> Any:
        check_input("DigitCaps", u, (None, self.in_caps, self.in_dim), self.weight.dtype)
        u_hat = capsule_predictions(u, self.weight.data)
        v, state = dynamic_routing(u_hat, self.iterations)
        self._save(u, u_hat, state)
        return v

    def backward(self, grad_out: Any) -> Any:
        u, u_hat, state = self._pop()
        # u_hat is not needed once routing's backward has read it: its gradient overwrites it
        g_hat = dynamic_routing_backward(grad_out, u_hat, state, self.detach_routing, out=u_hat)
        grad_u, grad_w = capsule_predictions_backward(g_hat, u, self.weight.data)
        self.weight.grad += grad_w
        return grad_u


DEFAULT_DIGITCAPS_STD = 0.01


# -- masking -----------------------------------------------------------------
def longest_capsules(lengths: Any, t: int = 1) -> Any:
    """The classes of the ``t`` longest capsules of each example, in increasing class
    order: lengths (B, J) -> integer indices (B, t), on the backend of ``lengths``.

    Any score that grows with the length gives the same answer (squared norms, class
    scores). Ties: with ``t`` = 1 the lowest class among the longest (``argmax``); with
    ``t`` > 1 a stable sort decides, so of equal lengths at the cut the higher classes
    are kept. Used by :class:`Mask` at test time, the MultiMNIST metric
    (:func:`capsnet.data.both_right`) and the MultiMNIST figure.
    """
    if lengths.ndim != 2:
        raise ValueError(f"longest_capsules expected lengths of shape (batch, n_caps), got {tuple(lengths.shape)}")
    if not isinstance(t, int) or not 1 <= t <= lengths.shape[1]:
        raise ValueError(f"longest_capsules expected t an integer in [1, {lengths.shape[1]}], got {t!r}")
    if t == 1:
        return lengths.argmax(axis=1)[:, None]
    xp = backend.get_array_module(lengths)
    return xp.sort(xp.argsort(lengths, axis=1, kind="stable")[:, -t:], axis=1)


class Mask(Module):
    """Keep chosen capsules per example, zero the others, flatten.

    ``Mask()`` (one target): (B, J, D) -> (B, J * D). With ``labels`` (B,) the
    capsule of the true class is kept (training); without, the longest capsule
    (test time).

    ``Mask(targets=T)``, T > 1 (MultiMNIST: two digits per image): one masked copy
    per target, stacked target-major, (B, J, D) -> (T * B, J * D): rows t * B + b
    keep capsule ``labels[b, t]`` of example b, for labels (B, T); without labels,
    the T longest capsules, in increasing class order. The choice itself passes no
    gradient; the backward sums the T copies' gradients.
    """

    def __init__(self, targets: int = 1):
        super().__init__()
        if not isinstance(targets, int) or targets < 1:
            raise ValueError(f"Mask targets must be an integer >= 1, got {targets!r}")
        self.targets = targets

    def extra_repr(self) -> str:
        return "" if self.targets == 1 else f"targets={self.targets}"

    def forward(self, v: Any, labels: Any = None) -> Any:
        xp = backend.get_array_module(v)
        if v.ndim != 3:
            raise ValueError(f"Mask expected capsules of shape (batch, n_caps, dim), got {tuple(v.shape)}")
        check_batch("Mask", tuple(v.shape))
        b, j, _ = v.shape
        t = self.targets
        if t > j:
            raise ValueError(f"Mask cannot keep {t} of {j} capsules")
        if labels is None:
            index = longest_capsules((v * v).sum(axis=-1), t)  # squared norms: the same order as lengths
        elif t == 1:
            index = check_labels("Mask", labels, b, j)[:, None]
        else:
            index = check_labels("Mask", labels, b, j, targets=t)
        # (T, B, J): mask[t, b] is one-hot at index[b, t]
        mask = (xp.arange(j)[None, None, :] == index.T[:, :, None]).astype(v.dtype)
        self._save(mask)
        return (v[None] * mask[..., None]).reshape(t * b, -1)

    def backward(self, grad_out: Any) -> Any:
        (mask,) = self._pop()
        t, b, j = mask.shape
        return (grad_out.reshape(t, b, j, -1) * mask[..., None]).sum(axis=0)


def check_labels(who: str, labels: Any, batch: int, n_classes: int, targets: int = 1) -> Any:
    """Validate integer class labels, (batch,) for one target per example or (batch,
    targets) for several, in [0, n_classes). On the GPU the range is checked without a
    host sync: the count of labels outside it waits on the device and is raised at the
    next flush (:mod:`capsnet.checks`)."""
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
        raise TypeError(f"{who} expected integer labels, got {getattr(labels, 'dtype', type(labels).__name__)}")
    expected = (batch,) if targets == 1 else (batch, targets)
    if tuple(labels.shape) != expected:
        raise ValueError(f"{who} expected labels of shape {expected}, got {tuple(labels.shape)}")
    checks.count_out_of_range(who, labels, 0, n_classes)
    return labels
