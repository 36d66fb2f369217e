"""Self-attention routing (Mazzia et al., Efficient-CapsNet, 2021): the squash variant,
``self_attention_routing`` / ``self_attention_routing_backward``, ``FCCaps`` and the
depthwise ``DepthwisePrimaryCaps``.

Notation: input capsules u_i (i < I, dim Din), votes u_hat_{j|i} = W_ij u_i (j < J, dim D).
For each output j the votes agree by self-attention, in one pass (no iterations):

    A_ij = sum_k <u_hat_{j|i}, u_hat_{j|k}> / sqrt(D)       (the attention logits)
    c_ij = softmax over j of A_ij                           (coupling coefficients)
    s_j  = sum_i (c_ij + b_ij) u_hat_{j|i}                  (b_ij: a learned prior, added after the softmax)
    v_j  = (1 - exp(-|s_j|)) s_j / |s_j|                    (the squash variant)

Because sum_k <u_hat_{j|i}, u_hat_{j|k}> = <u_hat_{j|i}, S_j> with S_j = sum_k u_hat_{j|k},
A costs O(I J D), not O(I^2 J D). Capsules are (batch, n_caps, dim) arrays; votes are
(batch, I, J, D) as for dynamic routing (:func:`capsnet.layers.capsule.capsule_predictions`).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from capsnet import backend
from capsnet.layers.base import Module, as_rng, check_batch, check_input, init_param
from capsnet.layers.capsule import capsule_predictions, capsule_predictions_backward, softmax
from capsnet.layers.conv import Conv2d

__all__ = [
    "AttentionState",
    "DepthwisePrimaryCaps",
    "EfficientSquash",
    "FCCaps",
    "efficient_squash",
    "efficient_squash_backward",
    "self_attention_routing",
    "self_attention_routing_backward",
]


# -- the squash variant ------------------------------------------------------------------
def _length_terms(s: Any, axis: int) -> tuple[Any, Any, Any]:
    """n = |s|, g(n) = (1 - e^-n) / n (1 at n = 0) and e^-n, keepdims along ``axis``.

    |s| is taken as m |s / m|, m = max |s_k|, so that no square overflows or underflows."""
    xp = backend.get_array_module(s)
    m = xp.abs(s).max(axis=axis, keepdims=True)
    scaled = s / xp.where(m > 0, m, 1)
    n = m * xp.sqrt((scaled * scaled).sum(axis=axis, keepdims=True))
    positive = n > 0
    safe = xp.where(positive, n, 1)
    g = xp.where(positive, -xp.expm1(-n) / safe, 1)  # expm1: exact for tiny n, where 1 - e^-n cancels
    return n, g, xp.exp(-n)


def efficient_squash(s: Any, axis: int = -1) -> Any:
    """v = (1 - e^{-|s|}) s / |s| along ``axis`` (Efficient-CapsNet, eq. 5); v -> s as s -> 0.

    The length is formed without squaring s itself, so v and its gradient stay finite
    for every s whose length the dtype can hold. Any shape in, the same shape out.
    """
    _, g, _ = _length_terms(s, axis)
    return s * g


def efficient_squash_backward(grad_out: Any, s: Any, axis: int = -1) -> Any:
    """Gradient of :func:`efficient_squash` w.r.t. s.

    With v = g(n) s, g(n) = (1 - e^-n) / n: dL/ds = g G + n g'(n) s_hat (s_hat . G),
    and n g'(n) = e^-n - g(n), which is 0 at s = 0 (where g = 1).
    """
    xp = backend.get_array_module(s, grad_out)
    n, g, e = _length_terms(s, axis)
    unit = s / xp.where(n > 0, n, 1)
    radial = (unit * grad_out).sum(axis=axis, keepdims=True)
    return grad_out * g + unit * (radial * (e - g))


class EfficientSquash(Module):
    """The squash variant along the last axis: (..., dim) -> (..., dim)."""

    def forward(self, s: Any) -> Any:
        self._save(s)
        return efficient_squash(s)

    def backward(self, grad_out: Any) -> Any:
        (s,) = self._pop()
        return efficient_squash_backward(grad_out, s)


# -- self-attention routing ----------------------------------------------------------------
class AttentionState(NamedTuple):
    """What :func:`self_attention_routing_backward` needs.

    total: S_j = sum_k u_hat_{j|k}, (B, J, D); c: coupling coefficients (B, I, J);
    s: the squash's input (B, J, D).
    """

    total: Any
    c: Any
    s: Any


def _by_output(u_hat: Any) -> Any:
    # (B, I, J, D) -> a (B, J, I, D) view, each (b, j) an I x D matrix for matmul
    return u_hat.transpose(0, 2, 1, 3)


def _check_votes(u_hat: Any, prior: Any) -> None:
    if getattr(u_hat, "ndim", None) != 4:
        raise ValueError(f"self_attention_routing expected votes of shape (batch, in_caps, out_caps, dim), "
                         f"got {tuple(getattr(u_hat, 'shape', ()))}")
    check_batch("self_attention_routing", tuple(u_hat.shape))
    if tuple(prior.shape) != tuple(u_hat.shape[1:3]):
        raise ValueError(f"self_attention_routing expected a prior of shape (in_caps, out_caps) = "
                         f"{tuple(u_hat.shape[1:3])}, got {tuple(prior.shape)}")


def self_attention_routing(u_hat: Any, prior: Any) -> tuple[Any, AttentionState]:
    """Efficient-CapsNet's routing, for every example at once (see the module docstring).

    u_hat: (B, I, J, D) votes u_hat_{j|i}; prior: (I, J) the learned b_ij.
    Returns v: (B, J, D) and the state :func:`self_attention_routing_backward` needs.
    """
    _check_votes(u_hat, prior)
    xp = backend.get_array_module(u_hat, prior)
    d = u_hat.shape[3]
    total = u_hat.sum(axis=1)  # S_j: (B, J, D)
    logits = (u_hat * total[:, None]).sum(axis=3) * u_hat.dtype.type(1 / math.sqrt(d))  # A_ij: (B, I, J)
    c = softmax(logits, axis=2)
    weights = (c + prior).transpose(0, 2, 1)  # (B, J, I)
    s = xp.matmul(weights[:, :, None, :], _by_output(u_hat))[:, :, 0, :]
    return efficient_squash(s), AttentionState(total, c, s)


def self_attention_routing_backward(grad_v: Any, u_hat: Any, prior: Any,
                                    state: AttentionState) -> tuple[Any, Any]:
    """Gradients of :func:`self_attention_routing` w.r.t. (u_hat (B, I, J, D), prior (I, J)).

    u_hat enters three times: in s_j (weight c_ij + b_ij), in A_ij directly (times S_j)
    and in every A_kj through S_j. With gs = dL/ds and gA = dL/dA:
    du_hat_{j|i} = (c_ij + b_ij) gs_j + (gA_ij S_j + sum_k gA_kj u_hat_{j|k}) / sqrt(D).
    """
    xp = backend.get_array_module(u_hat, grad_v, prior)
    d = u_hat.shape[3]
    gs = efficient_squash_backward(grad_v, state.s)  # (B, J, D)
    g_weights = xp.matmul(_by_output(u_hat), gs[..., None])[..., 0].transpose(0, 2, 1)  # <u_hat_ij, gs_j>: (B, I, J)
    c = state.c
    g_logits = c * (g_weights - (c * g_weights).sum(axis=2, keepdims=True))
    g_logits *= u_hat.dtype.type(1 / math.sqrt(d))
    g_total = xp.matmul(g_logits.transpose(0, 2, 1)[:, :, None, :], _by_output(u_hat))[:, :, 0, :]  # (B, J, D)
    grad = (c + prior)[..., None] * gs[:, None] + g_logits[..., None] * state.total[:, None] + g_total[:, None]
    return grad, g_weights.sum(axis=0)


# -- FCCaps ------------------------------------------------------------------------------
class FCCaps(Module):
    """Fully connected capsules with self-attention routing.

    Input (B, in_caps, in_dim) -> output (B, out_caps, out_dim). Weights W: (in_caps,
    out_caps, out_dim, in_dim), He-normal (std sqrt(2 / in_dim)) as in the authors'
    code; prior b: (in_caps, out_caps), zeros.
    """

    def __init__(self, in_caps: int = 16, in_dim: int = 8, out_caps: int = 10, out_dim: int = 16, *,
                 init_std: float | None = None, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FCCaps {name} must be an integer >= 1, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        std = math.sqrt(2.0 / in_dim) if init_std is None else init_std
        rng = as_rng(seed)
        self.weight = init_param((in_caps, out_caps, out_dim, in_dim), std, dtype, rng, "normal")
        self.prior = init_param((in_caps, out_caps), 0.0, dtype, rng, "zeros")

    def extra_repr(self) -> str:
        return f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, out_dim={self.out_dim}"

    def forward(self, u: Any) -> Any:
        check_input("FCCaps", u, (None, self.in_caps, self.in_dim), self.weight.dtype)
        u_hat = capsule_predictions(u, self.weight.data)
        v, state = self_attention_routing(u_hat, self.prior.data)
        self._save(u, u_hat, state)
        return v

    def backward(self, grad_out: Any) -> Any:
        u, u_hat, state = self._pop()
        g_hat, g_prior = self_attention_routing_backward(grad_out, u_hat, self.prior.data, state)
        grad_u, grad_w = capsule_predictions_backward(g_hat, u, self.weight.data)
        self.weight.grad += grad_w
        self.prior.grad += g_prior
        return grad_u


# -- primary capsules from a depthwise convolution -------------------------------------------
class DepthwisePrimaryCaps(Module):
    """Efficient-CapsNet's primary capsules: a depthwise convolution (one kernel per channel)
    whose ``kernel_size`` covers the whole map, so each channel gives one value; the
    ``n_caps * dim`` channels are then regrouped into capsules and squashed (the variant).

    Input (B, n_caps * dim, K, K) -> (B, n_caps, dim); capsule i holds channels
    [i dim, (i + 1) dim). Default: 16 capsules of 8D from 128 maps of 9 x 9.
    """

    def __init__(self, n_caps: int = 16, dim: int = 8, kernel_size: int = 9, *, dtype: Any = "float32",
                 seed: Any = None):
        super().__init__()
        self.n_caps, self.dim = n_caps, dim
        channels = n_caps * dim
        self.conv = Conv2d(channels, channels, kernel_size, groups=channels, dtype=dtype, seed=seed)

    def extra_repr(self) -> str:
        return f"n_caps={self.n_caps}, dim={self.dim}, kernel_size={self.conv.kernel_size}"

    def forward(self, x: Any) -> Any:
        k = self.conv.kernel_size
        check_input("DepthwisePrimaryCaps", x, (None, self.conv.in_channels, k, k), self.conv.weight.dtype)
        s = self.conv.forward(x).reshape(x.shape[0], self.n_caps, self.dim)
        self._save(s)
        return efficient_squash(s)

    def backward(self, grad_out: Any) -> Any:
        (s,) = self._pop()
        gs = efficient_squash_backward(grad_out, s)
        return self.conv.backward(gs.reshape(s.shape[0], -1, 1, 1))
