"""The paper's baseline CNN (Sabour et al. 2017, section 5), every size a constructor argument.

"The baseline is a standard CNN with three convolutional layers of 256, 256, 128
channels. Each has 5x5 kernels and stride of 1. The last convolutional layers are
followed by two fully connected layers of size 328, 192. The last fully connected
layer is connected with dropout to a 10 class softmax layer with cross entropy loss."

What the text leaves open, and the choices made here:

- **Padding and pooling.** The convolutions keep the image size (padding 2, "same") and
  there is no pooling: that is the only reading of the text that gives the paper's
  35.4M parameters (35,445,522 here: the first fully connected layer alone has
  28*28*128*328 weights). The official code's baseline is another network (two
  convolutions of 512 and 256 channels, each followed by 2x2 max pooling, one fully
  connected layer of 1024); ``pool=True`` adds 2x2 max pooling after the first two
  convolutions of this one (a 7x7 map into the first fully connected layer), a smaller
  and faster variant.
- **Activations.** ReLU after every convolution and both fully connected layers.
- **Dropout.** Probability 0.5 (not stated), before the 10-way output layer.
- **Output.** Logits; the softmax is inside :class:`~capsnet.layers.CrossEntropyLoss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capsnet.layers.activation import ReLU
from capsnet.layers.base import Module, Sequential, as_rng, check_input, conv_output_size
from capsnet.layers.conv import Conv2d
from capsnet.layers.dense import Flatten, Linear
from capsnet.layers.pool import MaxPool2d
from capsnet.layers.stochastic import Dropout
from capsnet.models.config import DictConfig

__all__ = ["BaselineCNN", "BaselineCNNConfig"]


@dataclass(frozen=True)
class BaselineCNNConfig(DictConfig):
    """Every size of the baseline; the defaults are the paper's MNIST baseline."""

    _what = "BaselineCNN configuration"

    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_classes: int = 10
    channels: tuple[int, ...] = (256, 256, 128)
    kernel: int = 5
    fc: tuple[int, ...] = (328, 192)
    dropout: float = 0.5
    pool: bool = False

    def __post_init__(self) -> None:
        if self.kernel % 2 != 1:
            raise ValueError(f"BaselineCNN kernel must be odd (the convolutions keep the size), got {self.kernel}")
        if not self.channels or not self.fc:
            raise ValueError("BaselineCNN needs at least one convolution and one fully connected layer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"BaselineCNN dropout must be in [0, 1), got {self.dropout}")

    @property
    def feature_size(self) -> tuple[int, int]:
        """(height, width) of the last convolution's output."""
        _, h, w = self.input_shape
        for k in range(len(self.channels)):
            if self.pool and k < 2:
                h, w = conv_output_size(h, 2, 2, 0), conv_output_size(w, 2, 2, 0)
        return h, w


class BaselineCNN(Module):
    """Convolutions (+ReLU) -> fully connected layers (+ReLU) -> dropout -> class logits.

    forward(x (B, C, H, W)) -> logits (B, n_classes); train with
    :class:`~capsnet.layers.CrossEntropyLoss`. See the module docstring for the choices
    the paper leaves open.
    """

    def __init__(self, config: BaselineCNNConfig | None = None, *, dtype: Any = "float32", seed: Any = 0,
                 **overrides: Any):
        super().__init__()
        cfg = config or BaselineCNNConfig()
        if overrides:
            cfg = BaselineCNNConfig.from_dict({**cfg.as_dict(), **overrides})
        self.config = cfg
        rng = as_rng(seed)
        c = cfg.input_shape[0]
        layers: list[Module] = []
        for k, out in enumerate(cfg.channels):
            # the first layer's input gradient is never needed
            layers += [Conv2d(c, out, cfg.kernel, padding=cfg.kernel // 2, input_grad=k > 0, dtype=dtype, seed=rng),
                       ReLU(inplace=True)]
            if cfg.pool and k < 2:
                layers.append(MaxPool2d(2))
            c = out
        layers.append(Flatten())
        self.features = Sequential(*layers)
        h, w = cfg.feature_size
        sizes = (c * h * w, *cfg.fc)
        head: list[Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            head += [Linear(a, b, dtype=dtype, seed=rng), ReLU()]
        head += [Dropout(cfg.dropout, seed=int(rng.integers(2**62))), Linear(sizes[-1], cfg.n_classes, dtype=dtype,
                                                                              seed=rng)]
        self.classifier = Sequential(*head)

    def extra_repr(self) -> str:
        return str(self.config)

    def forward(self, x: Any) -> Any:
        check_input("BaselineCNN", x, (None, *self.config.input_shape), self.features[0].weight.dtype)
        return self.classifier(self.features(x))

    def backward(self, grad_logits: Any) -> Any:
        """Backpropagate dL/dlogits; returns None (the first convolution computes no input gradient)."""
        return self.features.backward(self.classifier.backward(grad_logits))

    def predict(self, x: Any) -> tuple[Any, Any]:
        """(classes (B,), logits (B, K)) in eval mode (no dropout, no cache); the mode is restored."""
        with self.evaluating():
            logits = self.forward(x)
        return logits.argmax(axis=1), logits
