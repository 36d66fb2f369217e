"""A plain PyTorch CapsNet, the reference for the parity tests and the benchmark.

The same network as :class:`capsnet.models.capsnet.CapsNet`, written the way a
PyTorch user would write it: ``nn.Conv2d``, ``nn.Linear``, a DigitCaps weight
Parameter and routing by agreement in batched torch ops, differentiated by
autograd. Parameter names and shapes are the library's, so weights move both
ways with :meth:`TorchCapsNet.load_from_capsnet` and
:meth:`TorchCapsNet.capsnet_state_dict`.

Shapes: images (B, C, H, W), capsules (B, n_caps, dim). Nothing here imports
the library: the reference stays independent of the code it checks.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitCaps",
    "PrimaryCaps",
    "TorchCapsNet",
    "margin_loss",
    "reconstruction_loss",
    "squash",
    "total_loss",
]


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = {"float32": torch.float32, "float64": torch.float64}.get(np.dtype(dtype).name)
    if out not in (torch.float32, torch.float64):
        raise TypeError(f"TorchCapsNet works in float32 or float64, got dtype {dtype!r}")
    return out


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s| (eq. 1) along ``dim``."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return s * (n2.sqrt() / (1 + n2))


class PrimaryCaps(nn.Module):
    """Conv2d with n_types * dim channels regrouped into squashed capsules.

    (B, C, H, W) -> (B, n_types * OH * OW, dim); capsule i = type * OH * OW + y * OW + x,
    channel type * dim + d holds component d.
    """

    def __init__(self, in_channels: int, n_types: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.n_types, self.dim = n_types, dim
        self.conv = nn.Conv2d(in_channels, n_types * dim, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, _, oh, ow = y.shape
        s = y.view(b, self.n_types, self.dim, oh, ow).permute(0, 1, 3, 4, 2).reshape(b, -1, self.dim)
        return squash(s)


class DigitCaps(nn.Module):
    """Fully connected capsules with dynamic routing (Procedure 1).

    (B, in_caps, in_dim) -> (B, out_caps, out_dim); weight W (in_caps, out_caps,
    out_dim, in_dim) with u_hat[b, i, j] = W[i, j] @ u[b, i] (eq. 2).
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, iterations: int,
                 detach_routing: bool = False, init_std: float | None = None):
        super().__init__()
        self.iterations, self.detach_routing = iterations, detach_routing
        if init_std is None:
            init_std = 2.0 * out_caps / math.sqrt(out_dim * in_caps)
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u_hat = torch.einsum("ijdk,bik->bijd", self.weight, u)
        # With detach_routing the gradient reaches u_hat only through the last s_j,
        # with that iteration's coupling coefficients held fixed.
        u_route = u_hat.detach() if self.detach_routing else u_hat
        logits = u_hat.new_zeros(u_hat.shape[:3])  # b_ij, (B, I, J)
        for r in range(self.iterations):
            c = F.softmax(logits, dim=2)  # eq. 3, over the output capsules j
            last = r == self.iterations - 1
            s = torch.einsum("bij,bijd->bjd", c, u_hat if last else u_route)
            v = squash(s)
            if not last:
                logits = logits + torch.einsum("bijd,bjd->bij", u_route, v)
        return v


class TorchCapsNet(nn.Module):
    """Conv1 + ReLU -> PrimaryCaps -> DigitCaps -> lengths, and the masked decoder.

    Takes the keyword arguments of ``CapsNetConfig`` plus ``dtype``.
    forward(x (B, C, H, W), labels (B,) or None) -> (lengths (B, K), recon (B, C, H, W));
    the decoder sees the true class's capsule in training mode with labels,
    otherwise the longest capsule. With ``digits=T`` > 1 (MultiMNIST), labels (B, T)
    and recon (B, T, C, H, W): one decoder run per digit, masked by its capsule (at
    test time the T longest, in increasing class order).
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10,
                 conv_channels: int = 256, conv_kernel: int = 9, primary_types: int = 32,
                 primary_dim: int = 8, primary_kernel: int = 9, primary_stride: int = 2,
                 digit_dim: int = 16, routing_iterations: int = 3, detach_routing: bool = False,
                 digit_init_std: float | None = None, decoder_hidden: tuple[int, ...] = (512, 1024),
                 decoder: str = "fc", digits: int = 1, dtype: Any = torch.float32):
        super().__init__()
        c, h, w = input_shape
        self.digits = digits
        self.input_shape = tuple(input_shape)
        h2 = _conv_out(_conv_out(h, conv_kernel, 1), primary_kernel, primary_stride)
        w2 = _conv_out(_conv_out(w, conv_kernel, 1), primary_kernel, primary_stride)
        self.conv1 = nn.Conv2d(c, conv_channels, conv_kernel)
        self.primary = PrimaryCaps(conv_channels, primary_types, primary_dim, primary_kernel, primary_stride)
        self.digit = DigitCaps(primary_types * h2 * w2, primary_dim, n_classes, digit_dim, routing_iterations,
                               detach_routing, digit_init_std)
        layers: list[nn.Module] = []
        if decoder == "deconv":  # capsnet's CapsNetConfig(decoder="deconv"), layer for layer
            layers += [nn.Linear(n_classes * digit_dim, 16 * (h // 4) * (w // 4)), nn.ReLU(),
                       nn.Unflatten(1, (16, h // 4, w // 4)), nn.ConvTranspose2d(16, 64, 4, 2, 1), nn.ReLU(),
                       nn.ConvTranspose2d(64, c, 4, 2, 1), nn.Sigmoid(), nn.Flatten()]
        else:
            sizes = (n_classes * digit_dim, *decoder_hidden, c * h * w)
            for k in range(len(sizes) - 1):
                layers.append(nn.Linear(sizes[k], sizes[k + 1]))
                layers.append(nn.ReLU() if k < len(sizes) - 2 else nn.Sigmoid())
        self.decoder = nn.Sequential(*layers)
        self.to(_torch_dtype(dtype))

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        """The digit capsules v_j: (B, C, H, W) -> (B, K, digit_dim)."""
        return self.digit(self.primary(F.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.capsules(x)
        lengths = (v * v).sum(dim=-1).sqrt()
        if self.digits == 1:
            index = labels if (self.training and labels is not None) else lengths.argmax(dim=1)
            mask = F.one_hot(index, v.shape[1]).to(v.dtype)
            recon = self.decoder((v * mask[..., None]).flatten(1)).view(x.shape)
            return lengths, recon
        if self.training and labels is not None:
            index = labels
        else:
            index = lengths.topk(self.digits, dim=1).indices.sort(dim=1).values
        mask = F.one_hot(index, v.shape[1]).to(v.dtype)  # (B, T, K)
        masked = (v[:, None] * mask[..., None]).flatten(2)  # (B, T, K * D)
        recon = self.decoder(masked.flatten(0, 1)).view(x.shape[0], self.digits, *x.shape[1:])
        return lengths, recon

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (B,), lengths (B, K)) without the decoder, like ``CapsNet.predict``."""
        v = self.capsules(x)
        lengths = (v * v).sum(dim=-1).sqrt()
        return lengths.argmax(dim=1), lengths

    def load_from_capsnet(self, state: dict[str, np.ndarray]) -> None:
        """Copy weights from ``CapsNet.state_dict()`` (NumPy arrays, same names and shapes)."""
        own = self.state_dict()
        if set(own) != set(state):
            raise KeyError(f"names do not match: missing {sorted(set(own) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(own))}")
        with torch.no_grad():
            for name, tensor in own.items():
                value = torch.as_tensor(np.asarray(state[name]))
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: expected {tuple(tensor.shape)}, got {tuple(value.shape)}")
                tensor.copy_(value.to(tensor.dtype))

    def capsnet_state_dict(self) -> dict[str, np.ndarray]:
        """The weights as NumPy arrays by the library's names, for ``CapsNet.load_state_dict``."""
        return {name: t.detach().cpu().numpy().copy() for name, t in self.state_dict().items()}


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """Eq. 4, summed over classes, mean over the batch. lengths (B, K), labels (B,), or
    (B, T) with every listed class present."""
    t = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
    if labels.dim() == 2:
        t = t.amax(dim=1)
    present = F.relu(m_plus - lengths) ** 2
    absent = F.relu(lengths - m_minus) ** 2
    return (t * present + lam * (1 - t) * absent).sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, weight: float = 0.0005) -> torch.Tensor:
    """weight * sum of squared errors per image, mean over the batch."""
    return weight * ((recon - x) ** 2).flatten(1).sum(dim=1).mean()


def total_loss(lengths: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor, x: torch.Tensor,
               recon_weight: float = 0.0005) -> torch.Tensor:
    """Margin loss plus the weighted reconstruction loss, a 0-d tensor."""
    return margin_loss(lengths, labels) + reconstruction_loss(recon, x, recon_weight)
