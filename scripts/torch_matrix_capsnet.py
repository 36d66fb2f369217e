"""A PyTorch matrix-capsule network with EM routing (Hinton, Sabour and Frosst, 2018), the
reference for the parity tests and the benchmarks of :mod:`capsnet.layers.matrix_capsules`.

Written the way a PyTorch engineer would write it for speed, differentiated by autograd:
votes come out parent-major, (N, J, I, 16), from one ``torch.einsum`` (a bmm over the
children; a broadcast ``torch.matmul`` of the 4x4 matrices materialises both operands at
the votes' size and trained 6x slower in that part); every routing sum over the children is a batched matrix product over the vote
dimension: the M-step's means and second moments are w V and w V^2, (B, J, 1, I) x
(B, J, I, 16), and the E-step's Gaussian exponent sum_h (V_h - mu_h)^2 / var_h is
V^2 (1 / var) - 2 V (mu / var) + sum_h mu_h^2 / var_h, two (B, J, I, 16) x (B, J, 16, 1)
products. The only tensors of the votes' size are V and V^2 (and what autograd keeps of
them). The normalisation over the parents is ``torch.softmax`` of log a_j + log p_ij.

The equations and the choices (variance floor, mass scaled by J / I, lambda_t = lambda (t + 1) / T,
independent windows) are the library's, written again without reading its code paths;
the weights r_ij / (m_j + 1e-8) sum to s_j = m_j / (m_j + 1e-8), so the variance is
E_w[V^2] - (2 - s) mu^2, exactly the library's sum_i w_ij (V_ij - mu_j)^2. The Gaussian's
2 pi constant is left out (it cancels in the softmax). Parameter names and shapes are
the library's.

Shapes: poses (B, H, W, C, 4, 4), activations (B, H, W, C), votes (B, I, J, 16) for
``em_routing`` and (B, J, I, 16) for ``em_routing_by_parent``.
Nothing here imports the library.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassCaps", "ConvCaps", "TorchMatrixCapsNet", "em_routing", "em_routing_by_parent", "spread_loss"]

MASS_EPS = 1e-8


def m_step(V: torch.Tensor, V2: torch.Tensor, R: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor,
           beta_a: torch.Tensor, lam: float, var_floor: float) -> tuple[torch.Tensor, ...]:
    """V, V2: (B, J, I, P); R: (B, J, I) -> (mean, var, log var (B, J, P), logit of a (B, J), mass)."""
    _, j, i, p = V.shape
    r = R * a_in.unsqueeze(1)
    mass = r.sum(dim=2)
    w = (r / (mass.unsqueeze(2) + MASS_EPS)).unsqueeze(2)  # (B, J, 1, I)
    s = mass / (mass + MASS_EPS)
    mean = torch.matmul(w, V).squeeze(2)
    second = torch.matmul(w, V2).squeeze(2)
    var = (second - (2 - s).unsqueeze(2) * mean * mean).clamp_min(0) + var_floor
    log_var = torch.log(var)
    cost = (beta_u * p + 0.5 * log_var.sum(dim=2)) * (mass * j / i)
    return mean, var, log_var, lam * (beta_a - cost)


def e_step(V: torch.Tensor, V2: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_var: torch.Tensor,
           logit_a: torch.Tensor) -> torch.Tensor:
    """The new assignments R (B, J, I): softmax over the parents of log a_j + log p_ij."""
    inv_var = 1 / var
    quad = (torch.matmul(V2, inv_var.unsqueeze(3)) - 2 * torch.matmul(V, (mean * inv_var).unsqueeze(3))).squeeze(3)
    quad = quad + (mean * mean * inv_var).sum(dim=2, keepdim=True)
    log_p = -0.5 * (quad + log_var.sum(dim=2, keepdim=True))
    return torch.softmax(F.logsigmoid(logit_a).unsqueeze(2) + log_p, dim=1)


def em_routing_by_parent(V: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
                         iterations: int, inverse_temperature: float, var_floor: float,
                         detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """V (B, J, I, P) the votes parent-major, a_in (B, I) -> (mean (B, J, P), activations (B, J)).

    With ``detach`` the assignments are computed from detached tensors, so the gradient
    reaches the output only through the last M-step with its assignments held fixed."""
    b, j, i, _ = V.shape
    V2 = V * V
    routed = (V.detach(), V2.detach(), a_in.detach(), beta_u.detach(), beta_a.detach()) if detach else None
    R = V.new_full((b, j, i), 1.0 / j)
    for t in range(iterations):
        last = t == iterations - 1
        v, v2, a_i, bu, ba = (V, V2, a_in, beta_u, beta_a) if last or routed is None else routed
        lam = inverse_temperature * (t + 1) / iterations
        mean, var, log_var, logit_a = m_step(v, v2, R, a_i, bu, ba, lam, var_floor)
        if last:
            return mean, torch.sigmoid(logit_a)
        R = e_step(v, v2, mean, var, log_var, logit_a)
    raise AssertionError("unreachable")


def em_routing(votes: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
               iterations: int, inverse_temperature: float, var_floor: float,
               detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """votes (B, I, J, P), a_in (B, I) -> (mean (B, J, P), activations (B, J))."""
    return em_routing_by_parent(votes.transpose(1, 2).contiguous(), a_in, beta_u, beta_a, iterations,
                                inverse_temperature, var_floor, detach)


def votes_of(poses: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """poses (N, I, 4, 4), weight (I, J, 4, 4) -> (N, J, I, 16), V_ij = M_i W_ij, parent-major."""
    v = torch.einsum("nirk,ijks->njirs", poses, weight)  # one bmm over the children, then one copy
    return v.reshape(*v.shape[:3], 16)


class ConvCaps(nn.Module):
    def __init__(self, in_caps: int, out_caps: int, kernel_size: int, stride: int, iterations: int,
                 inverse_temperature: float = 0.01, var_floor: float = 1e-4, detach_routing: bool = False):
        super().__init__()
        self.k, self.stride, self.iterations = kernel_size, stride, iterations
        self.inverse_temperature, self.var_floor, self.detach = inverse_temperature, var_floor, detach_routing
        self.weight = nn.Parameter(torch.randn(kernel_size, kernel_size, in_caps, out_caps, 4, 4) * 0.5)
        self.beta_u = nn.Parameter(torch.zeros(out_caps))
        self.beta_a = nn.Parameter(torch.zeros(out_caps))

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = activations.shape
        k, s = self.k, self.stride
        # windows: (B, OH, OW, C, 4, 4, KY, KX) -> (B*OH*OW, KY*KX*C, 4, 4), children ordered (ky, kx, c)
        pw = poses.unfold(1, k, s).unfold(2, k, s)
        oh, ow = pw.shape[1:3]
        pw = pw.permute(0, 1, 2, 6, 7, 3, 4, 5).reshape(b * oh * ow, k * k * c, 4, 4)
        aw = activations.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3).reshape(b * oh * ow, k * k * c)
        votes = votes_of(pw, self.weight.reshape(k * k * c, -1, 4, 4))
        mean, a = em_routing_by_parent(votes, aw, self.beta_u, self.beta_a, self.iterations,
                                       self.inverse_temperature, self.var_floor, self.detach)
        d = a.shape[1]
        return mean.reshape(b, oh, ow, d, 4, 4), a.reshape(b, oh, ow, d)


class ClassCaps(nn.Module):
    def __init__(self, in_caps: int, n_classes: int, iterations: int, inverse_temperature: float = 0.01,
                 var_floor: float = 1e-4, coordinate_addition: bool = True):
        super().__init__()
        self.iterations, self.inverse_temperature, self.var_floor = iterations, inverse_temperature, var_floor
        self.coordinate_addition = coordinate_addition
        self.weight = nn.Parameter(torch.randn(in_caps, n_classes, 4, 4) * 0.5)
        self.beta_u = nn.Parameter(torch.zeros(n_classes))
        self.beta_a = nn.Parameter(torch.zeros(n_classes))

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = activations.shape
        votes = votes_of(poses.reshape(b * h * w, c, 4, 4), self.weight)  # (B*H*W, K, C, 16)
        k = votes.shape[1]
        votes = votes.reshape(b, h, w, k, c, 4, 4)
        if self.coordinate_addition:
            rows = (torch.arange(h, dtype=votes.dtype) + 0.5) / h
            cols = (torch.arange(w, dtype=votes.dtype) + 0.5) / w
            add = torch.zeros(h, w, 1, 1, 4, 4, dtype=votes.dtype)
            add[:, :, 0, 0, 0, 3] = rows[:, None]
            add[:, :, 0, 0, 1, 3] = cols[None, :]
            votes = votes + add
        # children ordered (y, x, c), as the library's
        votes = votes.permute(0, 3, 1, 2, 4, 5, 6).reshape(b, k, h * w * c, 16)
        mean, a = em_routing_by_parent(votes, activations.reshape(b, h * w * c), self.beta_u, self.beta_a,
                                       self.iterations, self.inverse_temperature, self.var_floor)
        return mean.reshape(b, k, 4, 4), a


def spread_loss(a: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """sum_{i != t} max(0, m - (a_t - a_i))^2, averaged over the batch."""
    a_t = a.gather(1, labels[:, None])
    gap = torch.clamp(margin - (a_t - a), min=0) ** 2
    wrong = 1 - F.one_hot(labels, a.shape[1]).to(a.dtype)
    return (gap * wrong).sum(dim=1).mean()


class TorchMatrixCapsNet(nn.Module):
    """Conv 5x5 stride 2 + ReLU -> primary matrix capsules (1x1) -> ConvCaps (3x3, stride 2) ->
    ConvCaps (3x3) -> ClassCaps; forward(x) -> class activations (B, K).

    Takes the keyword arguments of ``MatrixCapsNetConfig`` plus ``dtype``."""

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10,
                 conv_channels: int = 32, conv_kernel: int = 5, conv_stride: int = 2, primary_types: int = 8,
                 caps1: int = 8, caps2: int = 8, caps1_stride: int = 2, kernel_size: int = 3,
                 routing_iterations: int = 3, inverse_temperature: float = 0.01, var_floor: float = 1e-4,
                 coordinate_addition: bool = True, dtype: Any = torch.float32):
        super().__init__()
        c = input_shape[0]
        self.primary_types = primary_types
        self.conv1 = nn.Conv2d(c, conv_channels, conv_kernel, conv_stride)
        self.primary = nn.Conv2d(conv_channels, primary_types * 17, 1)
        self.caps1 = ConvCaps(primary_types, caps1, kernel_size, caps1_stride, routing_iterations,
                              inverse_temperature, var_floor)
        self.caps2 = ConvCaps(caps1, caps2, kernel_size, 1, routing_iterations, inverse_temperature, var_floor)
        self.classes = ClassCaps(caps2, n_classes, routing_iterations, inverse_temperature, var_floor,
                                 coordinate_addition)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        y = self.primary(h).permute(0, 2, 3, 1)
        b, hh, ww, _ = y.shape
        t = self.primary_types
        poses = y[..., : t * 16].reshape(b, hh, ww, t, 4, 4)
        a = torch.sigmoid(y[..., t * 16:])
        poses, a = self.caps1(poses, a)
        poses, a = self.caps2(poses, a)
        return self.classes(poses, a)[1]

    def load_from_capsnet(self, state: dict[str, np.ndarray]) -> None:
        """Copy the library's state_dict (names as in ``MatrixCapsNet``) into this network."""
        names = {"conv1.weight": self.conv1.weight, "conv1.bias": self.conv1.bias,
                 "primary.conv.weight": self.primary.weight, "primary.conv.bias": self.primary.bias}
        for layer in ("caps1", "caps2", "classes"):
            for p in ("weight", "beta_u", "beta_a"):
                names[f"{layer}.{p}"] = getattr(getattr(self, layer), p)
        with torch.no_grad():
            for name, tensor in names.items():
                tensor.copy_(torch.from_numpy(np.asarray(state[name])).to(tensor.dtype))
