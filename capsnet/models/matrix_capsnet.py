"""Matrix capsules with EM routing (Hinton, Sabour and Frosst, ICLR 2018): the network of
section 4, its spread-loss task, every size a constructor argument.

A 5x5 stride-2 convolution of A maps (ReLU) -> primary matrix capsules (1x1, B types) ->
ConvCaps1 (3x3, stride 2, C types) -> ConvCaps2 (3x3, stride 1, D types) -> ClassCaps with
coordinate addition. The class activations are the scores, trained with the spread loss
whose margin grows linearly from 0.2 to 0.9 over training. Small by default (A = 32,
B = C = D = 8); ``MatrixCapsNetConfig.paper_small()`` is the paper's smaller network
(A = 64, B = 8, C = D = 16) and ``MatrixCapsNetConfig.paper()`` its own (A = B = C = D = 32). On 28x28 MNIST the maps are 12x12, 12x12, 5x5 and 3x3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from capsnet import backend
from capsnet.layers.activation import ReLU
from capsnet.layers.base import Module, as_rng, check_input, conv_output_size
from capsnet.layers.conv import Conv2d
from capsnet.layers.matrix_capsules import ClassCaps, ConvCaps, MatrixPrimaryCaps, SpreadLoss
from capsnet.models.config import DictConfig

__all__ = ["MatrixCapsNet", "MatrixCapsNetConfig", "SpreadTask"]


@dataclass(frozen=True)
class MatrixCapsNetConfig(DictConfig):
    """Every size of the network and the routing's settings (see capsnet.layers.matrix_capsules)."""

    _what = "MatrixCapsNet configuration"

    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_classes: int = 10
    conv_channels: int = 32
    conv_kernel: int = 5
    conv_stride: int = 2
    primary_types: int = 8
    caps1: int = 8
    caps2: int = 8
    caps1_stride: int = 2
    kernel_size: int = 3
    routing_iterations: int = 3
    inverse_temperature: float = 0.01
    var_floor: float = 1e-4
    coordinate_addition: bool = True
    detach_routing: bool = False

    @classmethod
    def paper_small(cls, **overrides: Any) -> "MatrixCapsNetConfig":
        """The paper's smaller network: A = 64, B = 8, C = D = 16."""
        return cls(**{"conv_channels": 64, "primary_types": 8, "caps1": 16, "caps2": 16, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "MatrixCapsNetConfig":
        """The paper's network (A = B = C = D = 32, 318,964 parameters on MNIST), the size the
        public ports train on smallNORB and MNIST."""
        return cls(**{"conv_channels": 32, "primary_types": 32, "caps1": 32, "caps2": 32, **overrides})

    @property
    def feature_sizes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(height, width) after the convolution (and primary capsules), ConvCaps1 and ConvCaps2."""
        _, h, w = self.input_shape
        h, w = conv_output_size(h, self.conv_kernel, self.conv_stride, 0), conv_output_size(
            w, self.conv_kernel, self.conv_stride, 0)
        k = self.kernel_size
        h1, w1 = conv_output_size(h, k, self.caps1_stride, 0), conv_output_size(w, k, self.caps1_stride, 0)
        return (h, w), (h1, w1), (conv_output_size(h1, k, 1, 0), conv_output_size(w1, k, 1, 0))


class MatrixCapsNet(Module):
    """forward(x (B, C, H, W)) -> class activations (B, n_classes) in (0, 1);
    backward(grad_activations) -> None (the first convolution computes no input gradient).
    Train with :class:`~capsnet.layers.SpreadLoss` (:class:`SpreadTask` in the loop)."""

    # Its step is mostly element-wise routing passes, which NumPy runs on one core: under
    # capsnet.replicas it trains faster split into slices of any size than as one replica
    # with BLAS on every core (batch 32 on 2 cores: scripts/profile_em.py --slices).
    min_train_slice = 1
    # Replicas in worker processes (capsnet.processes) trained it 1.05x to 1.18x and predicted
    # 1.13x to 1.27x faster than replicas on threads at batch 16 to 100 (2 cores, quiet, 5
    # rounds: scripts/bench_replica_split.py --network em --processes [--mode infer],
    # scripts/results/replica-processes-em-{train,infer}.json).
    replica_kind = "processes"

    def __init__(self, config: MatrixCapsNetConfig | None = None, *, dtype: Any = "float32", seed: Any = 0,
                 **overrides: Any):
        super().__init__()
        cfg = config or MatrixCapsNetConfig()
        if overrides:
            cfg = MatrixCapsNetConfig.from_dict({**cfg.as_dict(), **overrides})
        cfg.feature_sizes  # refuses an input too small for the layers, before any allocation
        self.config = cfg
        rng = as_rng(seed)
        routing = dict(iterations=cfg.routing_iterations, inverse_temperature=cfg.inverse_temperature,
                       var_floor=cfg.var_floor, detach_routing=cfg.detach_routing, dtype=dtype)
        self.conv1 = Conv2d(cfg.input_shape[0], cfg.conv_channels, cfg.conv_kernel, cfg.conv_stride,
                            input_grad=False, dtype=dtype, seed=rng)
        self.relu = ReLU()
        self.primary = MatrixPrimaryCaps(cfg.conv_channels, cfg.primary_types, dtype=dtype, seed=rng)
        self.caps1 = ConvCaps(cfg.primary_types, cfg.caps1, cfg.kernel_size, cfg.caps1_stride, seed=rng, **routing)
        self.caps2 = ConvCaps(cfg.caps1, cfg.caps2, cfg.kernel_size, 1, seed=rng, **routing)
        self.classes = ClassCaps(cfg.caps2, cfg.n_classes, coordinate_addition=cfg.coordinate_addition, seed=rng,
                                 **routing)

    def extra_repr(self) -> str:
        return str(self.config)

    def capsules(self, x: Any) -> tuple[Any, Any]:
        """The class capsules: (poses (B, K, 4, 4), activations (B, K))."""
        check_input("MatrixCapsNet", x, (None, *self.config.input_shape), self.conv1.weight.dtype)
        poses, a = self.primary(self.relu(self.conv1(x)))
        poses, a = self.caps1(poses, a)
        poses, a = self.caps2(poses, a)
        return self.classes(poses, a)

    def forward(self, x: Any) -> Any:
        return self.capsules(x)[1]

    def backward(self, grad_activations: Any) -> None:
        g = self.classes.backward(None, grad_activations)
        g = self.caps1.backward(*self.caps2.backward(*g))
        self.conv1.backward(self.relu.backward(self.primary.backward(*g)))

    def predict(self, x: Any) -> tuple[Any, Any]:
        """(classes (B,), activations (B, K)) in eval mode; the mode is restored."""
        with self.evaluating():
            a = self.forward(x)
        return backend.get_array_module(a).argmax(a, axis=1), a


class SpreadTask:
    """The training loop's task for a MatrixCapsNet: the spread loss of the class activations.

    Its margin follows ``progress()``, the fraction of training done (0 to 1), before each
    training step: 0.2 at the start, 0.9 at the end. Without a clock (evaluation alone) the
    margin is ``margin``, 0.9 by default, the one training ends with.
    """

    def __init__(self, progress: Callable[[], float] | None = None, margin: float = 0.9):
        self.criterion = SpreadLoss(margin)
        self.progress = progress

    def forward(self, model: Module, batch: tuple) -> tuple[Any, Any]:
        self.criterion.train(model.training)
        if model.training and self.progress is not None:
            self.criterion.set_progress(self.progress())
        outputs = model(batch[0])
        return self.criterion(outputs, batch[1]), outputs

    def backward(self, model: Module) -> None:
        model.backward(self.criterion.backward())
