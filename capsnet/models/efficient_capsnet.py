"""Efficient-CapsNet (Mazzia, Salvetti and Chiaberge, 2021): four convolutions with batch
norm, depthwise primary capsules, FCCaps with self-attention routing, and the decoder.

The defaults are the paper's MNIST network: convolutions of 32 (5x5), 64, 64 and 128 (3x3,
the last with stride 2) maps, "valid" padding, so a 28x28 image gives 128 maps of 9x9; a
depthwise 9x9 convolution turns them into 16 capsules of 8D; FCCaps gives 10 capsules of
16D. 161,824 parameters without the decoder (the paper's "about 161K"); the decoder (fully
connected 512, 1024, then the image) reconstructs the input from the masked capsules and
is trained with the same loss as the CapsNet's: margin loss plus 0.0005 times the sum of
squared errors (the authors' 0.392 times the mean over 784 pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from capsnet import backend
from capsnet.layers.activation import ReLU, Sigmoid
from capsnet.layers.attention_routing import DepthwisePrimaryCaps, FCCaps
from capsnet.layers.base import Module, Sequential, as_rng, check_input, conv_output_size
from capsnet.layers.capsule import CapsuleLength, Mask
from capsnet.layers.conv import Conv2d
from capsnet.layers.dense import Linear
from capsnet.layers.norm import BatchNorm2d
from capsnet.models.config import DictConfig

__all__ = ["EfficientCapsNet", "EfficientCapsNetConfig"]


@dataclass(frozen=True)
class EfficientCapsNetConfig(DictConfig):
    """Every size of the network; the defaults are the paper's MNIST model."""

    _what = "EfficientCapsNet configuration"

    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_classes: int = 10
    conv_channels: tuple[int, ...] = (32, 64, 64, 128)
    conv_kernels: tuple[int, ...] = (5, 3, 3, 3)
    conv_strides: tuple[int, ...] = (1, 1, 1, 2)
    primary_caps: int = 16
    primary_dim: int = 8
    digit_dim: int = 16
    decoder_hidden: tuple[int, ...] = field(default=(512, 1024))

    def __post_init__(self) -> None:
        if not (len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides) >= 1):
            raise ValueError(f"EfficientCapsNet needs one kernel and one stride per convolution, got "
                             f"{len(self.conv_channels)} channels, {len(self.conv_kernels)} kernels and "
                             f"{len(self.conv_strides)} strides")
        if self.primary_caps * self.primary_dim != self.conv_channels[-1]:
            raise ValueError(f"EfficientCapsNet primary_caps * primary_dim must equal the last convolution's "
                             f"channels ({self.conv_channels[-1]}), got {self.primary_caps} * {self.primary_dim}")
        h, w = self.feature_size
        if h != w:
            raise ValueError(f"EfficientCapsNet's depthwise primary capsules need a square last map, got {h}x{w}")

    @property
    def feature_size(self) -> tuple[int, int]:
        """(height, width) of the last convolution's maps: the depthwise kernel's size."""
        _, h, w = self.input_shape
        for k, s in zip(self.conv_kernels, self.conv_strides):
            h, w = conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0)
        return h, w


class EfficientCapsNet(Module):
    """(Conv2d -> BatchNorm2d -> ReLU) x 4 -> DepthwisePrimaryCaps -> FCCaps -> lengths, and a
    decoder from the masked capsules.

    forward(x (B, C, H, W), labels (B,) or None) -> (lengths (B, K), recon (B, C, H, W)), as
    :class:`~capsnet.models.CapsNet`: the decoder sees the label's capsule in training with
    labels, the longest capsule otherwise. Train with :class:`~capsnet.models.CapsNetLoss`.
    """

    # Its GEMMs are small (at most 64 output channels): under capsnet.replicas a batch of 32
    # trained 1.12x faster as two replicas of 16 than as one with BLAS on both cores (2 cores,
    # quiet, twice: scripts/bench_replica_split.py; NOTES.md, 2026-12-07 third session), 1.10x
    # with the replicas' batch norms normalising the whole batch together (0.5.3). Batch 16, the
    # authors' setup, as two replicas of 8 ran at 0.87x (0.5.3, 9 rounds), so it stays one.
    min_train_slice = 16
    # Its step is hundreds of small NumPy calls, whose Python side holds the GIL: replicas in
    # worker processes (capsnet.processes) trained it 1.22x faster than replicas on threads at
    # batch 32 (0.99x at 100) and predicted 1.13x to 1.35x faster at batch 16 to 100 (2 cores,
    # quiet, 5 rounds: scripts/bench_replica_split.py --processes [--mode infer],
    # scripts/results/replica-processes-efficient-{train,infer}.json).
    replica_kind = "processes"

    def __init__(self, config: EfficientCapsNetConfig | None = None, *, dtype: Any = "float32", seed: Any = 0,
                 **overrides: Any):
        super().__init__()
        cfg = config or EfficientCapsNetConfig()
        if overrides:
            cfg = EfficientCapsNetConfig.from_dict({**cfg.as_dict(), **overrides})
        self.config = cfg
        rng = as_rng(seed)
        c = cfg.input_shape[0]
        layers: list[Module] = []
        for k, (out, kernel, stride) in enumerate(zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides)):
            layers += [Conv2d(c, out, kernel, stride, input_grad=k > 0, dtype=dtype, seed=rng),
                       BatchNorm2d(out, dtype=dtype), ReLU(inplace=True)]  # on BatchNorm's fresh output
            c = out
        self.features = Sequential(*layers)
        self.primary = DepthwisePrimaryCaps(cfg.primary_caps, cfg.primary_dim, cfg.feature_size[0], dtype=dtype,
                                            seed=rng)
        self.digit = FCCaps(cfg.primary_caps, cfg.primary_dim, cfg.n_classes, cfg.digit_dim, dtype=dtype, seed=rng)
        self.length = CapsuleLength()
        self.mask = Mask()
        sizes = (cfg.n_classes * cfg.digit_dim, *cfg.decoder_hidden, math.prod(cfg.input_shape))
        decoder: list[Module] = []
        for k in range(len(sizes) - 1):
            decoder += [Linear(sizes[k], sizes[k + 1], dtype=dtype, seed=rng),
                        ReLU(inplace=True) if k < len(sizes) - 2 else Sigmoid()]  # on Linear's fresh output
        self.decoder = Sequential(*decoder)

    def extra_repr(self) -> str:
        return str(self.config)

    def capsules(self, x: Any) -> Any:
        """The class capsules v_j: (B, C, H, W) -> (B, K, digit_dim)."""
        check_input("EfficientCapsNet", x, (None, *self.config.input_shape), self.features[0].weight.dtype)
        return self.digit(self.primary(self.features(x)))

    def forward(self, x: Any, labels: Any = None) -> tuple[Any, Any]:
        v = self.capsules(x)
        lengths = self.length(v)
        masked = self.mask(v, labels if self.training else None)
        return lengths, self.decoder(masked).reshape(x.shape)

    def backward(self, grad_lengths: Any, grad_recon: Any = None) -> None:
        """Backpropagate dL/dlengths and dL/drecon (either may be None); returns None."""
        g_v = self.length.backward(grad_lengths) if grad_lengths is not None else None
        if grad_recon is not None:
            g_mask = self.mask.backward(self.decoder.backward(grad_recon.reshape(grad_recon.shape[0], -1)))
            g_v = g_mask if g_v is None else g_v + g_mask
        else:
            self.mask.release()
            self.decoder.release()
        if g_v is None:
            raise ValueError("EfficientCapsNet.backward needs grad_lengths, grad_recon or both")
        self.features.backward(self.primary.backward(self.digit.backward(g_v)))

    def predict(self, x: Any) -> tuple[Any, Any]:
        """(classes (B,), lengths (B, K)) in eval mode, without the decoder; the mode is restored."""
        with self.evaluating():
            lengths = self.length(self.capsules(x))
        xp = backend.get_array_module(lengths)
        return xp.argmax(lengths, axis=1), lengths
