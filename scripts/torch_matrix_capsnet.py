"""A plain PyTorch matrix-capsule network with EM routing (Hinton, Sabour and Frosst, 2018),
the reference for the parity tests and the benchmark of :mod:`capsnet.layers.matrix_capsules`.

Written the way a PyTorch user would: votes by ``torch.matmul`` of 4x4 matrices, windows by
``Tensor.unfold``, the Gaussian log-density with its 2 pi constant, ``torch.logsumexp`` for
the E-step, all differentiated by autograd. The equations and the choices (variance floor,
mass scaled by J / I, lambda_t = lambda (t + 1) / T, independent windows) are the library's,
written again without reading its code paths. Parameter names and shapes are the library's.

Shapes: poses (B, H, W, C, 4, 4), activations (B, H, W, C), votes (B, I, J, 16).
Nothing here imports the library.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassCaps", "ConvCaps", "TorchMatrixCapsNet", "em_routing", "spread_loss"]


def em_routing(votes: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
               iterations: int, inverse_temperature: float, var_floor: float,
               detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """votes (B, I, J, P), a_in (B, I) -> (mean (B, J, P), activations (B, J)).

    With ``detach`` the assignments are computed from detached tensors, so the gradient
    reaches the output only through the last M-step with its assignments held fixed."""
    b, i, j, p = votes.shape
    route_votes = votes.detach() if detach else votes
    route_a_in = a_in.detach() if detach else a_in
    route_bu = beta_u.detach() if detach else beta_u
    route_ba = beta_a.detach() if detach else beta_a
    R = votes.new_full((b, i, j), 1.0 / j)
    for t in range(iterations):
        last = t == iterations - 1
        v, a_i, bu, ba = (votes, a_in, beta_u, beta_a) if last else (route_votes, route_a_in, route_bu, route_ba)
        lam = inverse_temperature * (t + 1) / iterations
        r = R * a_i.unsqueeze(2)
        mass = r.sum(dim=1)
        w = r / (mass.unsqueeze(1) + 1e-8)
        mean = torch.einsum("bij,bijp->bjp", w, v)
        var = torch.einsum("bij,bijp->bjp", w, (v - mean.unsqueeze(1)) ** 2) + var_floor
        log_sigma = 0.5 * torch.log(var)
        cost = ((bu.unsqueeze(1) + log_sigma) * (mass * j / i).unsqueeze(2)).sum(dim=2)
        a = torch.sigmoid(lam * (ba - cost))
        if last:
            return mean, a
        log_p = (-0.5 * math.log(2 * math.pi) - log_sigma.unsqueeze(1)
                 - (v - mean.unsqueeze(1)) ** 2 / (2 * var.unsqueeze(1))).sum(dim=3)
        log_ap = F.logsigmoid(lam * (ba - cost)).unsqueeze(1) + log_p
        R = torch.exp(log_ap - torch.logsumexp(log_ap, dim=2, keepdim=True))
    raise AssertionError("unreachable")


def votes_of(poses: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """poses (N, I, 4, 4), weight (I, J, 4, 4) -> (N, I, J, 16), V_ij = M_i W_ij."""
    v = torch.matmul(poses.unsqueeze(2), weight.unsqueeze(0))
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
        mean, a = em_routing(votes, aw, self.beta_u, self.beta_a, self.iterations, self.inverse_temperature,
                             self.var_floor, self.detach)
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
        votes = votes_of(poses.reshape(b * h * w, c, 4, 4), self.weight)  # (B*H*W, C, K, 16)
        k = votes.shape[2]
        votes = votes.reshape(b, h, w, c, k, 4, 4)
        if self.coordinate_addition:
            rows = (torch.arange(h, dtype=votes.dtype) + 0.5) / h
            cols = (torch.arange(w, dtype=votes.dtype) + 0.5) / w
            add = torch.zeros(h, w, 1, 1, 4, 4, dtype=votes.dtype)
            add[:, :, 0, 0, 0, 3] = rows[:, None]
            add[:, :, 0, 0, 1, 3] = cols[None, :]
            votes = votes + add
        mean, a = em_routing(votes.reshape(b, h * w * c, k, 16), activations.reshape(b, h * w * c), self.beta_u,
                             self.beta_a, self.iterations, self.inverse_temperature, self.var_floor)
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
