"""The CapsNet of Sabour, Frosst and Hinton (2017), every size a constructor argument."""
from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsnet import backend
from capsnet.layers.activation import ReLU, Sigmoid
from capsnet.layers.base import Module, Sequential, as_rng, check_input, conv_output_size
from capsnet.layers.capsule import CapsuleLength, DigitCaps, Mask, PrimaryCaps
from capsnet.layers.conv import Conv2d, ConvTranspose2d, conv2d_flops
from capsnet.layers.dense import Flatten, Linear, Reshape
from capsnet.layers.loss import MarginLoss, ReconstructionLoss
from capsnet.models.config import DictConfig


SAFETENSORS_FORMAT = "capsnet-safetensors-1"


def _safetensors(submodule: str | None = None) -> Any:
    """The optional safetensors package (or one of its submodules), with an install hint."""
    name = "safetensors" + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"reading and writing .safetensors files needs the safetensors package: "
                          f"pip install 'capsnet[safetensors]' (or pip install safetensors); {exc}") from exc


@dataclass(frozen=True)
class CapsNetConfig(DictConfig):
    """Every size of the network; the defaults are the paper's MNIST model."""

    _what = "CapsNet configuration"

    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_classes: int = 10
    conv_channels: int = 256
    conv_kernel: int = 9
    primary_types: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    digit_dim: int = 16
    routing_iterations: int = 3
    detach_routing: bool = False
    digit_init_std: float | None = None
    decoder_hidden: tuple[int, ...] = field(default=(512, 1024))
    # "fc": the paper's decoder, fully connected layers of decoder_hidden sizes.
    # "deconv": a fully connected layer to 16 maps of a quarter of the input size, then
    # two 4x4 stride-2 transposed convolutions (to 64 maps at half size, then the image),
    # as the ports that work on smallNORB and CIFAR do; decoder_hidden is not used.
    decoder: str = "fc"
    # Digits per image the decoder reconstructs, one at a time: 1 (MNIST) or 2 (MultiMNIST,
    # section 6: both digits are positives of the margin loss; at test time the two
    # longest capsules are the prediction).
    digits: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= self.n_classes:
            raise ValueError(f"CapsNet digits must be an integer in [1, n_classes={self.n_classes}], "
                             f"got {self.digits!r}")
        if self.decoder not in ("fc", "deconv"):
            raise ValueError(f"CapsNet decoder must be 'fc' or 'deconv', got {self.decoder!r}")
        if self.decoder == "deconv" and (self.input_shape[1] % 4 or self.input_shape[2] % 4):
            raise ValueError(f"the deconv decoder needs an input height and width divisible by 4 (two stride-2 "
                             f"steps up from a quarter size), got {self.input_shape[1:]}")

    @property
    def feature_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(height, width) after conv1 and after the PrimaryCaps convolution."""
        _, h, w = self.input_shape
        h1 = conv_output_size(h, self.conv_kernel, 1, 0)
        w1 = conv_output_size(w, self.conv_kernel, 1, 0)
        h2 = conv_output_size(h1, self.primary_kernel, self.primary_stride, 0)
        w2 = conv_output_size(w1, self.primary_kernel, self.primary_stride, 0)
        return (h1, w1), (h2, w2)

    @property
    def n_primary_caps(self) -> int:
        _, (h2, w2) = self.feature_sizes
        return self.primary_types * h2 * w2


def _decoder(cfg: "CapsNetConfig", dtype: Any, rng: Any) -> Sequential:
    """Masked capsules (B, K * digit_dim) -> reconstructions (B, C * H * W) in (0, 1)."""
    c, h, w = cfg.input_shape
    n_in = cfg.n_classes * cfg.digit_dim
    layers: list[Module] = []
    if cfg.decoder == "deconv":
        layers += [Linear(n_in, 16 * (h // 4) * (w // 4), dtype=dtype, seed=rng), ReLU(), Reshape(16, h // 4, w // 4),
                   ConvTranspose2d(16, 64, 4, stride=2, padding=1, dtype=dtype, seed=rng), ReLU(),
                   ConvTranspose2d(64, c, 4, stride=2, padding=1, dtype=dtype, seed=rng), Sigmoid(), Flatten()]
        return Sequential(*layers)
    sizes = (n_in, *cfg.decoder_hidden, c * h * w)
    for k in range(len(sizes) - 1):
        layers.append(Linear(sizes[k], sizes[k + 1], dtype=dtype, seed=rng))
        layers.append(ReLU() if k < len(sizes) - 2 else Sigmoid())
    return Sequential(*layers)


class CapsNet(Module):
    """Conv1 (+ReLU) -> PrimaryCaps -> DigitCaps (routing) -> lengths, and a decoder
    that reconstructs the input from the masked digit capsules.

    forward(x (B, C, H, W), labels (B,) or None) -> (lengths (B, K), recon (B, C, H, W)).
    In training mode with labels, the decoder sees the capsule of the true class;
    otherwise (test time) the longest capsule.

    With ``digits=T`` > 1 (MultiMNIST), labels are (B, T) and the decoder runs once per
    digit, masked by that digit's capsule (the T runs go through it as one batch of
    T * B): recon is (B, T, C, H, W), recon[:, t] the reconstruction of digit t alone.
    Without labels (test time) the T longest capsules are decoded, in increasing class
    order.
    """

    def __init__(self, config: CapsNetConfig | None = None, *, input_grad: bool = False,
                 dtype: Any = "float32", seed: Any = 0, **overrides: Any):
        super().__init__()
        cfg = config or CapsNetConfig()
        if overrides:
            cfg = CapsNetConfig.from_dict({**cfg.as_dict(), **overrides})
        self.config = cfg
        rng = as_rng(seed)
        c, h, w = cfg.input_shape
        self.conv1 = Conv2d(c, cfg.conv_channels, cfg.conv_kernel, input_grad=input_grad, dtype=dtype, seed=rng)
        self.relu = ReLU(inplace=True)  # conv1's fresh output and PrimaryCaps' fresh input gradient
        self.primary = PrimaryCaps(cfg.conv_channels, cfg.primary_types, cfg.primary_dim, cfg.primary_kernel,
                                   cfg.primary_stride, dtype=dtype, seed=rng)
        self.digit = DigitCaps(cfg.n_primary_caps, cfg.primary_dim, cfg.n_classes, cfg.digit_dim,
                               cfg.routing_iterations, detach_routing=cfg.detach_routing,
                               init_std=cfg.digit_init_std, dtype=dtype, seed=rng)
        self.length = CapsuleLength()
        self.mask = Mask(cfg.digits)
        self.decoder = _decoder(cfg, dtype, rng)

    def extra_repr(self) -> str:
        return str(self.config)

    def _check(self, x: Any) -> Any:
        return check_input("CapsNet", x, (None, *self.config.input_shape), self.conv1.weight.dtype)

    def _primary_capsules(self, x: Any) -> Any:
        """The primary capsules u_i: (B, C, H, W) -> (B, n_primary_caps, primary_dim)."""
        xp = self._check(x)
        backend.get_array_module(x, self.conv1.weight.data)
        h = self.relu(self.conv1.forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1))))
        return self.primary.forward_nhwc(h)

    def capsules(self, x: Any) -> Any:
        """The digit capsules v_j: (B, C, H, W) -> (B, K, digit_dim)."""
        return self.digit(self._primary_capsules(x))

    def forward(self, x: Any, labels: Any = None) -> tuple[Any, Any]:
        v = self.capsules(x)
        lengths = self.length(v)
        masked = self.mask(v, labels if self.training else None)
        return lengths, self._images(self.decoder(masked), x.shape)

    def _images(self, flat: Any, shape: tuple) -> Any:
        """Decoder output (T * B, C * H * W), target-major -> (B, C, H, W), or (B, T, C, H, W)."""
        t = self.config.digits
        if t == 1:
            return flat.reshape(shape)
        return flat.reshape(t, shape[0], *shape[1:]).swapaxes(0, 1)

    def backward(self, grad_lengths: Any, grad_recon: Any = None) -> Any:
        """Backpropagate dL/dlengths and dL/drecon (either may be None); returns
        dL/dx when built with ``input_grad=True``, else None."""
        g_v = self.length.backward(grad_lengths) if grad_lengths is not None else None
        if grad_recon is not None:
            if self.config.digits > 1:  # (B, T, C, H, W) -> target-major rows, as the decoder ran
                xp = backend.get_array_module(grad_recon)
                grad_recon = xp.ascontiguousarray(grad_recon.swapaxes(0, 1))
            g_masked = self.decoder.backward(grad_recon.reshape(-1, self.decoder_outputs))
            g_mask = self.mask.backward(g_masked)
            g_v = g_mask if g_v is None else g_v + g_mask
        else:
            self.mask.release()
            self.decoder.release()
        if g_v is None:
            raise ValueError("CapsNet.backward needs grad_lengths, grad_recon or both")
        g_h = self.relu.backward(self.primary.backward_nhwc(self.digit.backward(g_v)))
        gx = self.conv1.backward_nhwc(g_h)
        return None if gx is None else gx.transpose(0, 3, 1, 2)

    @property
    def decoder_outputs(self) -> int:
        """C * H * W: the size of one reconstruction."""
        return math.prod(self.config.input_shape)

    def predict(self, x: Any) -> tuple[Any, Any]:
        """(classes (B,), lengths (B, K)) without running the decoder; no cache kept.

        It switches to eval mode, which drops the caches: don't call it between a
        training forward and its backward."""
        with self.evaluating():
            lengths = self.length(self.capsules(x))
        return lengths.argmax(axis=1), lengths

    # -- weights others can read ----------------------------------------------
    def save_safetensors(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights to a ``.safetensors`` file (the ``safetensors`` extra), with
        the configuration in its metadata so :meth:`from_safetensors` (or any reader)
        can rebuild the network. Names are :meth:`state_dict`'s; written atomically."""
        numpy_io = _safetensors("numpy")
        path = Path(path)
        meta = {"format": SAFETENSORS_FORMAT, "model": "CapsNet", "dtype": str(self.dtype),
                "config": json.dumps(self.config.as_dict()), **(metadata or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            numpy_io.save_file(dict(self.state_dict()), str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, backend_name: str | None = None) -> "CapsNet":
        """A CapsNet rebuilt from a file written by :meth:`save_safetensors` (or
        ``python -m capsnet.export``), on ``backend_name`` (default: the current backend)."""
        safetensors = _safetensors()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no safetensors file at {path}")
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != SAFETENSORS_FORMAT or "config" not in meta:
            raise ValueError(f"{path} holds no capsnet configuration in its metadata (format "
                             f"{meta.get('format')!r}, expected {SAFETENSORS_FORMAT!r})")
        config = CapsNetConfig.from_dict(json.loads(meta["config"]))
        with backend.use(backend_name or backend.get_backend()):
            model = cls(config, dtype=meta.get("dtype", "float32"))
        model.load_state_dict(state)
        return model

    def reconstruct(self, x: Any, labels: Any = None) -> Any:
        """Reconstructions (B, C, H, W) from the capsule of ``labels``, or the longest
        ((B, T, C, H, W) from the T digits' capsules with ``digits=T`` > 1)."""
        with self.evaluating():
            v = self.capsules(x)
            return self._images(self.decoder(self.mask(v, labels)), x.shape)

    def decode(self, v: Any) -> Any:
        """Images (B, C, H, W) decoded from capsules v (B, K, digit_dim) as they are
        (no masking: zero the capsules the decoder should not see); no cache kept."""
        with self.evaluating():
            return self.decoder(v.reshape(v.shape[0], -1)).reshape(v.shape[0], *self.config.input_shape)

    def routing(self, x: Any) -> tuple[Any, Any]:
        """(capsules v (B, K, digit_dim), coupling coefficients c (B, n_primary_caps, K))
        of the last routing iteration; eval mode, no cache kept. c[b, i] sums to 1 over the
        classes; primary capsule i = type * OH * OW + y * OW + x (see PrimaryCaps)."""
        from capsnet.layers.capsule import capsule_predictions, dynamic_routing  # noqa: PLC0415

        with self.evaluating():
            u = self._primary_capsules(x)
            v, state = dynamic_routing(capsule_predictions(u, self.digit.weight.data), self.digit.iterations)
        return v, state.c[-1].swapaxes(1, 2)


class CapsNetLoss(Module):
    """Total loss: margin loss on the lengths plus the weighted reconstruction loss.

    ``loss = criterion(lengths, recon, labels, images)`` returns a 0-d array and
    keeps both parts in ``.margin`` and ``.reconstruction``; ``criterion.backward()``
    returns (dL/dlengths, dL/drecon) for :meth:`CapsNet.backward`. Like every
    module it caches its inputs for the backward in training mode only.
    """

    def __init__(self, recon_weight: float = 0.0005, m_plus: float = 0.9, m_minus: float = 0.1,
                 lam: float = 0.5):
        super().__init__()
        self.margin_loss = MarginLoss(m_plus, m_minus, lam)
        self.recon_loss = ReconstructionLoss(recon_weight)
        self.margin = self.reconstruction = None

    def forward(self, lengths: Any, recon: Any, labels: Any, images: Any) -> Any:
        """labels (B,) or (B, T); images, the reconstruction targets, of recon's shape:
        (B, C, H, W), or (B, T, C, H, W) for one digit alone per target."""
        self.margin = self.margin_loss(lengths, labels)
        self.reconstruction = self.recon_loss(recon, images)
        return self.margin + self.reconstruction

    def backward(self, grad_out: Any = 1.0) -> tuple[Any, Any]:
        return self.margin_loss.backward(grad_out), self.recon_loss.backward(grad_out)



class CapsNetTask:
    """The paper's objective for a :class:`CapsNet` (or an Efficient-CapsNet), as the
    training loop's task: margin loss on the capsule lengths plus ``recon_weight`` times
    the reconstruction loss. The decoder sees the capsule of the label in training and the
    longest one in evaluation.

    ``forward(model, batch) -> (loss, (lengths, reconstructions))`` and
    ``backward(model)``, the protocol of :class:`capsnet.training.Trainer`. For a CapsNet
    with ``digits=T`` > 1 (MultiMNIST), batches are ``(images, labels (B, T), digit_1,
    ..., digit_T)``, each digit alone on its canvas: every digit is a positive of the
    margin loss and the reconstruction loss sums the T digits' squared errors, each
    against the decoder's run for that digit. In evaluation the decoder sees the T longest
    capsules in increasing class order, so the targets are put in increasing label order too.
    """

    def __init__(self, recon_weight: float = 0.0005):
        self.criterion = CapsNetLoss(recon_weight)

    def forward(self, model: Module, batch: tuple) -> tuple[Any, Any]:
        x, y = batch[0], batch[1]
        self.criterion.train(model.training)
        lengths, recon = model(x, y)
        return self.criterion(lengths, recon, y, self.targets(model, batch)), (lengths, recon)

    @staticmethod
    def targets(model: Module, batch: tuple) -> Any:
        """What the reconstructions are compared with: the images (B, C, H, W), or the
        digits alone (B, T, C, H, W)."""
        x, y = batch[0], batch[1]
        if getattr(y, "ndim", 1) == 1:
            return x
        t = y.shape[1]
        if len(batch) != 2 + t:
            raise ValueError(f"CapsNetTask with labels of shape {tuple(y.shape)} expected batches (images, labels, "
                             f"then the {t} digits alone), got {len(batch)} arrays")
        xp = backend.get_array_module(x)
        digits = xp.stack(batch[2:], axis=1)
        if model.training:
            return digits
        order = xp.argsort(y, axis=1)  # evaluation: the decoder's runs are in increasing class order
        return xp.take_along_axis(digits, order.reshape(*order.shape, *(1,) * (digits.ndim - 2)), axis=1)

    def backward(self, model: Module) -> None:
        model.backward(*self.criterion.backward())

    @staticmethod
    def images(model: Module, batch: tuple) -> dict[str, Any]:
        """A few inputs and their reconstructions from the longest capsule (the T longest,
        merged, for T digits), host arrays (N, C, H, W): what TensorBoard shows each epoch."""
        x = batch[0]
        recon = model.reconstruct(x)
        if recon.ndim == 5:  # (B, T, C, H, W): the T digits' reconstructions on one canvas
            recon = recon.sum(axis=1)
        return {"inputs": backend.to_numpy(x), "reconstructions": backend.to_numpy(recon)}


def flops_per_image(config: CapsNetConfig, training: bool = True, input_grad: bool = False,
                    primary_algorithm: str = "im2col") -> int:
    """Multiply-add FLOPs (2 per MAC) of the matrix products for one image.

    Forward: conv1, PrimaryCaps conv, u_hat = W u, the routing contractions and
    the decoder. Training adds the backward products: weight gradients of every
    layer and input gradients of every layer but the first (unless input_grad).
    Element-wise work (squash, softmax, ReLU, losses) is not counted.

    The default counts the network as defined (direct convolution); this is the
    count a FLOP bound uses. ``primary_algorithm="fourier"`` counts what the
    Fourier method actually executes for PrimaryCaps instead (its per-frequency
    products and DFTs, :func:`capsnet.layers.conv.conv2d_flops`). The per-call
    weight transform, which does not grow with the batch, is left out.
    """
    if primary_algorithm not in ("im2col", "fourier"):
        raise ValueError(f"primary_algorithm must be 'im2col' or 'fourier', got {primary_algorithm!r}")
    c, h, w = config.input_shape
    (oh1, ow1), (oh2, ow2) = config.feature_sizes
    conv1 = oh1 * ow1 * config.conv_channels * c * config.conv_kernel ** 2
    primary = oh2 * ow2 * config.primary_types * config.primary_dim * config.conv_channels * config.primary_kernel ** 2
    n_i, n_j = config.n_primary_caps, config.n_classes
    u_hat = n_i * n_j * config.digit_dim * config.primary_dim
    r = config.routing_iterations
    routing = (2 * r - 1) * n_i * n_j * config.digit_dim  # s_j each iteration, agreements between
    if config.decoder == "deconv":  # per input pixel of a transposed convolution: Cin * Cout * 4 * 4
        decoder = (n_j * config.digit_dim * 16 * (h // 4) * (w // 4) + (h // 4) * (w // 4) * 16 * 64 * 16
                   + (h // 2) * (w // 2) * 64 * c * 16)
    else:
        sizes = (n_j * config.digit_dim, *config.decoder_hidden, c * h * w)
        decoder = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    decoder *= config.digits  # one decoder run per digit
    forward = conv1 + primary + u_hat + routing + decoder
    # backward: every product twice (weights and inputs), routing ~2x forward,
    # and the first layer's input gradient only on request.
    backward = 2 * (primary + u_hat + decoder) + conv1 * (2 if input_grad else 1) + 2 * routing
    total = 2 * (forward + backward) if training else 2 * forward
    if primary_algorithm == "fourier":
        args = (oh1, ow1, config.conv_channels, config.primary_types * config.primary_dim,
                config.primary_kernel, config.primary_stride)
        total -= (conv2d_flops(*args, training=training, algorithm="im2col")
                  - conv2d_flops(*args, training=training, algorithm="fourier"))
    return total


def n_parameters(model: Module) -> int:
    """The number of trainable numbers in ``model``'s parameters."""
    return sum(math.prod(p.shape) for p in model.parameters())
