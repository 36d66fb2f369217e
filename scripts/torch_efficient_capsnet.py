"""A plain PyTorch Efficient-CapsNet (Mazzia et al., 2021), the reference for the parity
tests and the benchmark of :mod:`capsnet.layers.attention_routing`.

Written the way a PyTorch user would: ``nn.Conv2d(groups=...)``, ``nn.BatchNorm2d``, the
self-attention of the votes as the full I x I einsum of the authors' code (not our
O(I J D) rewrite), differentiated by autograd. Parameter names and shapes are the
library's, so weights move with :meth:`TorchEfficientCapsNet.load_from_capsnet`.

Shapes: images (B, C, H, W), capsules (B, n_caps, dim), votes (B, I, J, D). Nothing here
imports the library.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FCCaps", "TorchEfficientCapsNet", "efficient_squash", "self_attention_routing"]


def efficient_squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(1 - exp(-|s|)) s / |s| along ``dim`` (Efficient-CapsNet, eq. 5)."""
    n = s.norm(dim=dim, keepdim=True)
    return (1 - torch.exp(-n)) * s / n


def self_attention_routing(u_hat: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """u_hat (B, I, J, D) votes, prior (I, J) -> v (B, J, D).

    A_ij = sum_k <u_hat_{j|i}, u_hat_{j|k}> / sqrt(D); c = softmax over j; s_j = sum_i (c_ij + b_ij) u_hat_{j|i}.
    """
    d = u_hat.shape[-1]
    pairs = torch.einsum("bijd,bkjd->bjik", u_hat, u_hat)  # every <u_hat_{j|i}, u_hat_{j|k}>
    logits = pairs.sum(dim=-1).transpose(1, 2) / math.sqrt(d)  # (B, I, J)
    c = F.softmax(logits, dim=2)
    s = torch.einsum("bij,bijd->bjd", c + prior, u_hat)
    return efficient_squash(s)


class FCCaps(nn.Module):
    """(B, in_caps, in_dim) -> (B, out_caps, out_dim); weight (in_caps, out_caps, out_dim, in_dim), prior (in_caps, out_caps)."""

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * math.sqrt(2.0 / in_dim))
        self.prior = nn.Parameter(torch.zeros(in_caps, out_caps))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u_hat = torch.einsum("ijdk,bik->bijd", self.weight, u)
        return self_attention_routing(u_hat, self.prior)


class TorchEfficientCapsNet(nn.Module):
    """Four convolutions with batch norm and ReLU, depthwise primary capsules, FCCaps, lengths,
    and (``decoder_hidden`` not empty) the masked fully connected decoder.

    Takes the keyword arguments of ``EfficientCapsNetConfig`` plus ``dtype``.
    forward(x, labels or None) -> (lengths (B, K), recon (B, C, H, W) or None).
    """

    def __init__(self, *, input_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10,
                 conv_channels: tuple[int, ...] = (32, 64, 64, 128), conv_kernels: tuple[int, ...] = (5, 3, 3, 3),
                 conv_strides: tuple[int, ...] = (1, 1, 1, 2), primary_caps: int = 16, primary_dim: int = 8,
                 digit_dim: int = 16, decoder_hidden: tuple[int, ...] = (512, 1024), bn_momentum: float = 0.1,
                 dtype: Any = torch.float32):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.primary_caps, self.primary_dim = primary_caps, primary_dim
        convs, norms = [], []
        for out, k, s in zip(conv_channels, conv_kernels, conv_strides):
            convs.append(nn.Conv2d(c, out, k, s))
            norms.append(nn.BatchNorm2d(out, momentum=bn_momentum))
            c, h, w = out, (h - k) // s + 1, (w - k) // s + 1
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.primary = nn.Conv2d(c, c, h, groups=c)
        self.digit = FCCaps(primary_caps, primary_dim, n_classes, digit_dim)
        sizes = (n_classes * digit_dim, *decoder_hidden, int(np.prod(input_shape)))
        self.decoder = nn.ModuleList(nn.Linear(sizes[k], sizes[k + 1]) for k in range(len(sizes) - 1)) \
            if decoder_hidden else None
        self.to(dtype)

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        u = efficient_squash(self.primary(x).reshape(x.shape[0], self.primary_caps, self.primary_dim))
        return self.digit(u)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        v = self.capsules(x)
        lengths = v.norm(dim=-1)
        if self.decoder is None:
            return lengths, None
        index = labels if (self.training and labels is not None) else lengths.argmax(dim=1)
        mask = F.one_hot(index, v.shape[1]).to(v.dtype)
        h = (v * mask[..., None]).reshape(x.shape[0], -1)
        for k, layer in enumerate(self.decoder):
            h = layer(h)
            h = torch.relu(h) if k < len(self.decoder) - 1 else torch.sigmoid(h)
        return lengths, h.reshape(x.shape)

    # -- weights from and to the library's names -------------------------------------------------
    def _names(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out[f"features.{3 * k}.weight"] = conv.weight
            out[f"features.{3 * k}.bias"] = conv.bias
            out[f"features.{3 * k + 1}.weight"] = norm.weight
            out[f"features.{3 * k + 1}.bias"] = norm.bias
            out[f"features.{3 * k + 1}.running_mean"] = norm.running_mean
            out[f"features.{3 * k + 1}.running_var"] = norm.running_var
        out["primary.conv.weight"] = self.primary.weight
        out["primary.conv.bias"] = self.primary.bias
        out["digit.weight"] = self.digit.weight
        out["digit.prior"] = self.digit.prior
        if self.decoder is not None:
            for k, layer in enumerate(self.decoder):
                out[f"decoder.{2 * k}.weight"] = layer.weight
                out[f"decoder.{2 * k}.bias"] = layer.bias
        return out

    def load_from_capsnet(self, state: dict[str, np.ndarray]) -> None:
        """Copy the library's state_dict (names as in ``EfficientCapsNet``) into this network."""
        with torch.no_grad():
            for name, tensor in self._names().items():
                tensor.copy_(torch.from_numpy(np.asarray(state[name])).to(tensor.dtype))
