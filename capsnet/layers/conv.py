"""2-D convolution layers: Conv2d (grouped and depthwise too) and ConvTranspose2d, their
pure forward/backward functions in NCHW and NHWC, and the FLOP count.

Thin wrappers over the engine in :mod:`capsnet.layers.convolution`: each call describes
its convolution once (a ConvGeometry) and one of the engine's algorithms (im2col + GEMM,
Fourier, direct shifted products, pointwise GEMM, Winograd F(2x2, 3x3) and F(4x4, 3x3)) carries it out; ``algorithm="auto"``
lets the engine choose by measurement. ``im2col``/``col2im`` are the engine's shared
patch layout, re-exported here.
"""
from __future__ import annotations

import math
from typing import Any

from capsnet import backend
from capsnet.layers.base import Module, as_rng, check_input, conv_output_size, init_param
from capsnet.layers.convolution import ALGORITHMS as ENGINE_ALGORITHMS
from capsnet.layers.convolution import Algorithm, ConvGeometry, Im2col, check_groups, choose, make
from capsnet.layers.convolution.algorithm import bias_grad
from capsnet.layers.convolution.fourier import fourier_flops
from capsnet.layers.convolution.im2col import LAYOUTS, layout_for
from capsnet.layers.convolution.patches import col2im, im2col
from capsnet.layers.norm import BatchNorm2d

ALGORITHMS = ("auto", *ENGINE_ALGORITHMS)


def _forward_replaced(module: Module, cls: type) -> bool:
    """Whether ``module`` computes its forward otherwise than ``cls`` does (a subclass's
    override, a wrapper set on the instance): then nothing is folded into or out of it."""
    return "forward" in vars(module) or type(module).forward is not cls.forward


def _run_forward(x_nhwc: Any, w: Any, b: Any | None, stride: int, padding: int, groups: int, algorithm: str,
                 layout: str = "auto") -> Any:
    g = ConvGeometry.of(x_nhwc, w, stride, padding, groups)
    name = choose(g, training=False, algorithm=algorithm, xp=backend.get_array_module(x_nhwc, w))
    alg = Im2col(layout) if name == "im2col" else make(name)
    return alg.forward(g, x_nhwc, w, b, training=False)[0]


def _run_backward(grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int, padding: int, groups: int, algorithm: str,
                  need_input_grad: bool = True, layout: str = "auto") -> tuple[Any | None, Any, Any]:
    g = ConvGeometry.of(x_nhwc, w, stride, padding, groups)
    name = choose(g, training=True, input_grad=need_input_grad, algorithm=algorithm,
                  xp=backend.get_array_module(x_nhwc, w))
    alg = Im2col(layout) if name == "im2col" else make(name)
    return alg.backward(g, grad_y_nhwc, alg.save(g, x_nhwc, w), w, need_input_grad)


def conv2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0, layout: str = "auto",
                *, groups: int = 1, algorithm: str = "im2col") -> Any:
    """Channels-last convolution: x (B, H, W, C), w (O, C / groups, KH, KW), b (O,) -> (B, OH, OW, O).

    ``algorithm`` (default im2col, whose patch ``layout`` may be pinned, see
    :func:`~capsnet.layers.convolution.im2col.layout_for`) or "auto".
    """
    return _run_forward(x_nhwc, w, b, stride, padding, groups, algorithm, layout)


def conv2d_nhwc_backward(
    grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int = 1, padding: int = 0, need_input_grad: bool = True,
    layout: str = "auto", *, groups: int = 1, algorithm: str = "im2col",
) -> tuple[Any | None, Any, Any]:
    """Gradients of :func:`conv2d_nhwc` w.r.t. (x, w, b); grad_y: (B, OH, OW, O)."""
    return _run_backward(grad_y_nhwc, x_nhwc, w, stride, padding, groups, algorithm, need_input_grad, layout)


def conv2d(x: Any, w: Any, b: Any | None = None, stride: int = 1, padding: int = 0, groups: int = 1,
           algorithm: str = "auto") -> Any:
    """2-D cross-correlation. x: (B, C, H, W), w: (O, C / groups, KH, KW), b: (O,) -> (B, O, OH, OW).

    ``algorithm``: one of ALGORITHMS; "auto" lets the engine choose (inference costs)."""
    xp = backend.get_array_module(x, w)
    y = _run_forward(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, b, stride, padding, groups, algorithm)
    return y.transpose(0, 3, 1, 2)


def conv2d_backward(
    grad_out: Any, x: Any, w: Any, stride: int = 1, padding: int = 0, groups: int = 1, algorithm: str = "auto"
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv2d` w.r.t. (x, w, b); grad_out: (B, O, OH, OW)."""
    xp = backend.get_array_module(grad_out, x, w)
    gx, gw, gb = _run_backward(xp.ascontiguousarray(grad_out.transpose(0, 2, 3, 1)),
                               xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, stride, padding, groups, algorithm)
    return gx.transpose(0, 3, 1, 2), gw, gb


def conv2d_flops(height: int, width: int, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, *, training: bool = True, input_grad: bool = True,
                 algorithm: str = "im2col") -> int:
    """Flops (2 per multiply-add) of a convolution's matrix products for one image.

    The forward, and in training the weight gradient and (``input_grad``) the input
    gradient. ``algorithm="fourier"`` counts what the Fourier method executes
    instead of the direct convolution (:func:`~capsnet.layers.convolution.fourier.fourier_flops`;
    its per-call weight transform, which does not grow with the batch, left out).
    """
    if algorithm not in ("im2col", "fourier"):
        raise ValueError(f"algorithm must be 'im2col' or 'fourier', got {algorithm!r}")
    k = kernel_size
    args = (height + 2 * padding, width + 2 * padding, in_channels, out_channels, k, k, stride)
    index = 0 if algorithm == "im2col" else 1
    total = fourier_flops(*args)[index]
    if training:
        total += fourier_flops(*args, backward=True, input_grad=input_grad)[index]
    return total


class Conv2d(Module):
    """Convolution layer. Input (B, C, H, W) -> output (B, O, OH, OW).

    Weights (O, C, KH, KW) and bias (O,) start uniform in +-1/sqrt(C*KH*KW), as in
    PyTorch. ``input_grad=False`` skips the input gradient (a network's first layer).

    ``algorithm`` picks how the same map is computed: one of the engine's algorithms
    (``"im2col"``, ``"fourier"``, ``"direct"``, ``"pointwise"``, ``"winograd"``, ``"winograd4"``, see
    :mod:`capsnet.layers.convolution`) or ``"auto"``, which asks the engine per input
    geometry, training or not (:meth:`algorithm_for`; a fitted cost model, or timing in
    benchmark mode). All agree to rounding; the attribute may be changed between steps.

    ``groups=G`` splits the channels into G groups convolved separately (weights
    (O, C / G, KH, KW), bound +-1/sqrt(C/G*KH*KW)); ``groups=in_channels`` is a depthwise
    convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        groups: int = 1,
        input_grad: bool = True,
        algorithm: str = "auto",
        dtype: Any = "float32",
        seed: Any = None,
    ):
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Conv2d algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self._algorithms: dict[str, Algorithm] = {}  # one instance per algorithm used: they own their memory
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("stride", stride, 1),
            ("padding", padding, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Conv2d {name} must be an integer >= {low}, got {value!r}")
        check_groups(groups, in_channels, out_channels, "Conv2d")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.input_grad = input_grad
        bound = 1.0 / math.sqrt(in_channels // groups * kernel_size * kernel_size)
        rng = as_rng(seed)
        self.weight = init_param((out_channels, in_channels // groups, kernel_size, kernel_size), bound, dtype, rng)
        self.bias = init_param((out_channels,), bound, dtype, rng) if bias else None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
            + (f", groups={self.groups}" if self.groups != 1 else "")
            + (f", algorithm={self.algorithm!r}" if self.algorithm != "auto" else "")
        )

    def geometry(self, height: int, width: int, batch: int) -> ConvGeometry:
        """The engine's description of this layer on a batch of height x width inputs."""
        w = self.weight.data
        k = self.kernel_size
        return ConvGeometry(batch, height, width, self.in_channels, self.out_channels, k, k, self.stride,
                            self.padding, self.groups, w.dtype.name, ":".join(map(str, backend.device_key(w))))

    def algorithm_for(self, height: int, width: int, batch: int) -> str:
        """The algorithm used for a batch of height x width inputs in the current mode: the
        pinned one, or the engine's choice (:func:`capsnet.layers.convolution.choose`)."""
        return choose(self.geometry(height, width, batch), self.training, self.input_grad, self.algorithm,
                      backend.get_array_module(self.weight.data))

    def _instance(self, name: str) -> Algorithm:
        alg = self._algorithms.get(name)
        if alg is None:
            alg = self._algorithms[name] = make(name)
        return alg

    def share_with_replica(self, replica: "Conv2d") -> Any:
        """Let ``replica`` (this layer in a copy of the model, :mod:`capsnet.replicas`) share
        this layer's Fourier weight spectrum; returns the holder, opened and closed around each step."""
        return self._instance("fourier").memory.share_weight_spectrum(replica._instance("fourier").memory)

    def _release_scratch(self) -> None:
        for alg in self._algorithms.values():
            alg.release()

    def _scratch_nbytes(self) -> int:
        return sum(alg.nbytes for alg in self._algorithms.values())

    def forward_nhwc(self, x_nhwc: Any) -> Any:
        """(B, H, W, C) -> (B, OH, OW, O), for layers that stay channels-last."""
        return self._forward_nhwc(x_nhwc, self.weight.data, self.bias.data if self.bias is not None else None)

    def folded_with(self, following: Module) -> Any:
        """In evaluation, a :class:`~capsnet.layers.BatchNorm2d` of this layer's output
        channels after it becomes part of the convolution: weights w scale and bias
        b scale + shift (:meth:`~capsnet.layers.BatchNorm2d.inference_affine`), made at each
        call from the current parameters and statistics, so the batch norm's passes over the
        output are gone. The same map up to float rounding. None otherwise (training, or
        any other module)."""
        if (self.training or following.training or not isinstance(following, BatchNorm2d)
                or following.num_features != self.out_channels or _forward_replaced(self, Conv2d)
                or _forward_replaced(following, BatchNorm2d)):
            return None

        def conv_then_batch_norm(x: Any) -> Any:
            scale, shift = following.inference_affine()
            return self._forward(x, self.weight.data * scale.reshape(-1, 1, 1, 1),
                                 shift if self.bias is None else self.bias.data * scale + shift)

        return conv_then_batch_norm

    def _forward_nhwc(self, x_nhwc: Any, w: Any, b: Any | None) -> Any:
        check_input(type(self).__name__, x_nhwc, (None, None, None, self.in_channels), self.weight.dtype,
                    "channels-last input")
        backend.get_array_module(x_nhwc, self.weight.data)
        g = self.geometry(x_nhwc.shape[1], x_nhwc.shape[2], x_nhwc.shape[0])
        name = choose(g, self.training, self.input_grad, self.algorithm, backend.get_array_module(x_nhwc))
        if self.training and "fourier" in self._algorithms:
            self._algorithms["fourier"].memory.start_training()  # inference memory goes back before training
        alg = self._instance(name)
        y, saved = alg.forward(g, x_nhwc, w, b, self.training)
        self._save(g, alg, saved)
        return y

    def _accumulate(self, grad_w: Any, grad_b: Any) -> None:
        """Adds one backward's weight and bias gradients into the parameters' (the bias's when
        the layer has one)."""
        self.weight.grad += grad_w
        if self.bias is not None:
            self.bias.grad += grad_b

    def backward_nhwc(self, grad_y: Any) -> Any:
        g, alg, saved = self._pop()
        if getattr(saved, "channels_first", False):  # the forward took channels-first memory
            xp = backend.get_array_module(grad_y)
            gx, gw, gb = alg.backward_channels_first(g, xp.ascontiguousarray(grad_y.transpose(0, 3, 1, 2)), saved,
                                                     self.weight.data, self.input_grad)
            gx = None if gx is None else gx.transpose(0, 2, 3, 1)
        else:
            gx, gw, gb = alg.backward(g, grad_y, saved, self.weight.data, self.input_grad)
        self._accumulate(gw, gb)
        return gx

    def forward(self, x: Any) -> Any:
        return self._forward(x, self.weight.data, self.bias.data if self.bias is not None else None)

    def _forward(self, x: Any, w: Any, b: Any | None) -> Any:
        check_input(type(self).__name__, x, (None, self.in_channels, None, None), self.weight.dtype)
        xp = backend.get_array_module(x, self.weight.data)
        if x.flags.c_contiguous and not x.transpose(0, 2, 3, 1).flags.c_contiguous:
            # channels-first memory (a user's own NCHW arrays; a network passes channels-last
            # views): an algorithm that can (1x1 products, depthwise) runs on it as it is
            g = self.geometry(x.shape[2], x.shape[3], x.shape[0])
            alg = self._instance(choose(g, self.training, self.input_grad, self.algorithm, xp))
            if alg.channels_first(g):
                y, saved = alg.forward_channels_first(g, x, w, b)
                self._save(g, alg, saved)
                return y
        return self._forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, b).transpose(0, 3, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        xp = backend.get_array_module(grad_out)
        if self._cache is not None and getattr(self._cache[2], "channels_first", False):
            g, alg, saved = self._pop()  # the forward took channels-first memory: so does the backward
            gx, gw, gb = alg.backward_channels_first(g, grad_out, saved, self.weight.data, self.input_grad)
            self._accumulate(gw, gb)
            return gx
        if (not self.input_grad and grad_out.ndim == 4 and grad_out.flags.c_contiguous
                and not grad_out.transpose(0, 2, 3, 1).flags.c_contiguous and self._cache is not None):
            g, alg, saved = self._cache
            if isinstance(alg, Im2col) and layout_for(g, alg.layout) == "taps":
                # a first layer given channels-first memory (a network passes a channels-last
                # view): the gradients from it as it is, not from a channels-last copy
                self._pop()
                gw, gb = alg.gradients_channels_first(g, grad_out, saved, self.weight.data)
                self._accumulate(gw, gb)
                return None
        gx = self.backward_nhwc(xp.ascontiguousarray(grad_out.transpose(0, 2, 3, 1)))
        return None if gx is None else gx.transpose(0, 3, 1, 2)


def _transpose_geometry(x_shape: tuple, w: Any, stride: int, padding: int, output_padding: int) -> tuple[int, int]:
    cin, cout, kh, kw = w.shape
    if x_shape[3] != cin:
        raise ValueError(f"transposed convolution expected {cin} input channels, got {x_shape[3]}")
    if not 0 <= output_padding < stride:
        raise ValueError(f"transposed convolution output_padding must be smaller than the stride ({stride}), "
                         f"got {output_padding}")
    ho = (x_shape[1] - 1) * stride - 2 * padding + kh + output_padding
    wo = (x_shape[2] - 1) * stride - 2 * padding + kw + output_padding
    if ho < 1 or wo < 1:
        raise ValueError(f"transposed convolution output would be empty: input {x_shape[1]}x{x_shape[2]}, kernel "
                         f"{kh}x{kw}, stride {stride}, padding {padding}")
    return ho, wo


def _transpose_as_conv(x_shape: tuple, w: Any, stride: int, padding: int, output_padding: int) -> ConvGeometry:
    """The convolution whose input gradient is this transposed convolution: input (B, HO, WO,
    Cout), weights w (Cin, Cout, KH, KW) read as (O = Cin, C = Cout, KH, KW)."""
    ho, wo = _transpose_geometry(x_shape, w, stride, padding, output_padding)
    cin, cout, kh, kw = w.shape
    return ConvGeometry(x_shape[0], ho, wo, cout, cin, kh, kw, stride, padding, 1, w.dtype.name,
                        ":".join(map(str, backend.device_key(w))))


def conv_transpose2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0,
                          output_padding: int = 0) -> Any:
    """Channels-last transposed convolution, the adjoint of :func:`conv2d_nhwc` in x.

    x (B, H, W, Cin), w (Cin, Cout, KH, KW) (PyTorch's layout), b (Cout,) -> (B, HO, WO, Cout)
    with HO = (H - 1) stride - 2 padding + KH + output_padding: the engine's im2col input
    gradient of the convolution with the same weights (one GEMM, then the patch gather).
    """
    g = _transpose_as_conv(tuple(x_nhwc.shape), w, stride, padding, output_padding)
    y = Im2col("rows").input_grad(g, x_nhwc, None, w)
    if b is not None:
        y = y + b
    return y


def conv_transpose2d_nhwc_backward(grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int = 1,
                                   padding: int = 0) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv_transpose2d_nhwc` w.r.t. (x, w, b); grad_y: (B, HO, WO, Cout).
    The input gradient is the convolution of grad_y with the same kernel, and the weight
    gradient that convolution's weight gradient with x as its output gradient."""
    g = ConvGeometry.of(grad_y_nhwc, w, stride, padding)
    alg = Im2col("rows")
    gx, saved = alg.forward(g, grad_y_nhwc, w, None)
    gw = alg.weight_grad(g, x_nhwc, saved, w)
    return gx, gw, bias_grad(grad_y_nhwc)


def conv_transpose2d(x: Any, w: Any, b: Any | None = None, stride: int = 1, padding: int = 0,
                     output_padding: int = 0) -> Any:
    """Transposed convolution. x: (B, Cin, H, W), w: (Cin, Cout, KH, KW), b: (Cout,) -> (B, Cout, HO, WO)."""
    return conv_transpose2d_nhwc(x.transpose(0, 2, 3, 1), w, b, stride, padding,
                                 output_padding).transpose(0, 3, 1, 2)


def conv_transpose2d_backward(grad_out: Any, x: Any, w: Any, stride: int = 1,
                              padding: int = 0) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv_transpose2d` w.r.t. (x, w, b); grad_out: (B, Cout, HO, WO)."""
    gx, gw, gb = conv_transpose2d_nhwc_backward(grad_out.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1), w,
                                                stride, padding)
    return gx.transpose(0, 3, 1, 2), gw, gb


class ConvTranspose2d(Module):
    """Transposed convolution ("deconvolution"). Input (B, Cin, H, W) -> (B, Cout, HO, WO),
    HO = (H - 1) stride - 2 padding + kernel + output_padding (output_padding < stride
    picks among the sizes that a stride-s convolution maps back to H).

    Weights (Cin, Cout, K, K) and bias (Cout,) start uniform in +-1/sqrt(Cout*K*K), as in
    PyTorch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 output_padding: int = 0, bias: bool = True, *, dtype: Any = "float32", seed: Any = None):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                 ("output_padding", output_padding, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ConvTranspose2d {name} must be an integer >= {low}, got {value!r}")
        if output_padding >= stride:
            raise ValueError(f"ConvTranspose2d output_padding must be smaller than the stride ({stride}), "
                             f"got {output_padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.output_padding = kernel_size, stride, padding, output_padding
        bound = 1.0 / math.sqrt(out_channels * kernel_size * kernel_size)
        rng = as_rng(seed)
        self.weight = init_param((in_channels, out_channels, kernel_size, kernel_size), bound, dtype, rng)
        self.bias = init_param((out_channels,), bound, dtype, rng) if bias else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}")

    def forward(self, x: Any) -> Any:
        check_input("ConvTranspose2d", x, (None, self.in_channels, None, None), self.weight.dtype)
        xp = backend.get_array_module(x, self.weight.data)
        x_nhwc = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        b = self.bias.data if self.bias is not None else None
        y = conv_transpose2d_nhwc(x_nhwc, self.weight.data, b, self.stride, self.padding, self.output_padding)
        self._save(x_nhwc)
        return y.transpose(0, 3, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        (x_nhwc,) = self._pop()
        xp = backend.get_array_module(grad_out)
        gy = xp.ascontiguousarray(grad_out.transpose(0, 2, 3, 1))
        gx, gw, gb = conv_transpose2d_nhwc_backward(gy, x_nhwc, self.weight.data, self.stride, self.padding)
        self.weight.grad += gw
        if self.bias is not None:
            self.bias.grad += gb
        return gx.transpose(0, 3, 1, 2)


__all__ = [
    "ALGORITHMS",
    "LAYOUTS",
    "Conv2d",
    "ConvTranspose2d",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "conv2d_flops",
    "conv2d_nhwc",
    "conv2d_nhwc_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "conv_transpose2d_nhwc",
    "conv_transpose2d_nhwc_backward",
    "conv_output_size",
    "im2col",
]
