"""2-D convolutions: Conv2d (grouped and depthwise too), ConvTranspose2d, their pure
forward/backward functions in NCHW and NHWC, im2col/col2im and the FLOP count.

They are computed as im2col plus one matrix product; Conv2d can take the Fourier-domain
route of :mod:`capsnet.layers.fourier` instead (``algorithm``).

Internally the convolution works channels-last: the patch matrix has rows
(batch, out_y, out_x) and columns (kernel_y, kernel_x, channel), so every copy
in im2col/col2im moves whole contiguous channel vectors. The layers, conv2d and
conv_transpose2d take and return NCHW arrays like every other image API here; the
``*_nhwc`` functions are that channels-last core, for callers that keep NHWC.

For small batches the patch matrix is smaller than the weights, and what costs is
bringing the weights (O, C, KH, KW) to that column order and their gradient back
(three passes over a transposed 21 MB array for PrimaryCaps). There the columns are
ordered (channel, kernel_y, kernel_x) instead, the weights' own order, so the
products read and write them in place (``layout="channels"``; see _layout).
"""
from __future__ import annotations

import math
from typing import Any

from capsnet import backend
from capsnet.layers.base import Module, as_rng, check_input, conv_output_size, init_param
from capsnet.layers.fourier import FourierConv, fourier_flops, fourier_pays_off

ALGORITHMS = ("auto", "im2col", "fourier")


def _row_groups(kh: int, kw: int, c: int, min_depth: int = 1024) -> list[range]:
    """Kernel rows taken together so each partial product has depth >= min_depth.

    A whole im2col of PrimaryCaps' input would be 300 MB at batch 100; one kernel
    row at a time (depth KW*C = 2304) keeps the matrix products efficient with a
    ninth of the memory. Conv1 (C = 1) takes all rows at once.
    """
    rows = min(kh, max(1, -(-min_depth // (kw * c))))
    return [range(start, min(start + rows, kh)) for start in range(0, kh, rows)]


def _gather(x_pad: Any, rows: range, kw: int, stride: int, oh: int, ow: int, out: Any) -> Any:
    """Patches of kernel rows ``rows``: out (B, OH, OW, len(rows), KW, C).

    One copy from a strided view of x_pad in which the patch of output pixel
    (b, oy, ox) starts at row rows.start + stride*oy, column stride*ox.
    """
    xp = backend.get_array_module(x_pad)
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.strides
    patches = xp.lib.stride_tricks.as_strided(
        x_pad[:, rows.start :], shape=(b, oh, ow, len(rows), kw, c),
        strides=(sb, stride * sh, stride * sw, sh, sw, sc),
    )
    out[...] = patches
    return out


def _patch_groups(x_pad: Any, kh: int, kw: int, stride: int, oh: int, ow: int) -> Any:
    """Yield (rows, patches (B, OH, OW, len(rows), KW, C), the same as a matrix) for each
    group of kernel rows, reusing one buffer across groups."""
    xp = backend.get_array_module(x_pad)
    b, c = x_pad.shape[0], x_pad.shape[3]
    buf = None
    for rows in _row_groups(kh, kw, c):
        if buf is None or buf.shape[3] != len(rows):
            buf = xp.empty((b, oh, ow, len(rows), kw, c), dtype=x_pad.dtype)
        _gather(x_pad, rows, kw, stride, oh, ow, buf)
        yield rows, buf, buf.reshape(b * oh * ow, -1)


def _scatter_add(g_pad: Any, gcol: Any, rows: range, kw: int, stride: int, oh: int, ow: int) -> None:
    """Adjoint of :func:`_gather`: add patch gradients back into g_pad (B, H, W, C)."""
    for a, ky in enumerate(rows):
        ys = slice(ky, ky + stride * oh, stride)
        for kx in range(kw):
            g_pad[:, ys, kx : kx + stride * ow : stride, :] += gcol[:, :, :, a, kx, :]


LAYOUTS = ("auto", "rows", "channels")


def _layout(layout: str, rows: int, out_channels: int, in_channels: int) -> str:
    """The patch-column order for a product of ``rows`` patch rows (B * OH * OW).

    "rows": (ky, kx, c), built a group of kernel rows at a time, whole channel vectors per
    copy; the weights are brought to that order on each call. "channels": (c, ky, kx), the
    weights' order, so no weight-sized copy or transpose; its gather moves single values,
    which pays only while the patch matrix is no larger than the weights (rows <= O).
    "auto" picks by that rule; with one input channel the two orders are the same."""
    if layout not in LAYOUTS:
        raise ValueError(f"convolution layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout
    return "channels" if in_channels > 1 and rows <= out_channels else "rows"


def _gather_channel_major(x_pad: Any, kh: int, kw: int, stride: int, oh: int, ow: int) -> Any:
    """Patches (B * OH * OW, C * KH * KW), columns ordered (c, ky, kx): one copy from a
    strided view."""
    xp = backend.get_array_module(x_pad)
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.strides
    patches = xp.lib.stride_tricks.as_strided(
        x_pad, shape=(b, oh, ow, c, kh, kw), strides=(sb, stride * sh, stride * sw, sc, sh, sw))
    return xp.ascontiguousarray(patches).reshape(b * oh * ow, -1)


def _scatter_add_channel_major(g_pad: Any, gcol: Any, kh: int, kw: int, stride: int, oh: int, ow: int) -> None:
    """Adjoint of :func:`_gather_channel_major`; gcol (B, OH, OW, C, KH, KW)."""
    for ky in range(kh):  # a loop over kernel offsets
        ys = slice(ky, ky + stride * oh, stride)
        for kx in range(kw):
            g_pad[:, ys, kx : kx + stride * ow : stride, :] += gcol[..., ky, kx]


def _pad(x_nhwc: Any, padding: int) -> Any:
    if not padding:
        return x_nhwc
    xp = backend.get_array_module(x_nhwc)
    return xp.pad(x_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def im2col(x_nhwc: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Patches of a channels-last batch.

    x_nhwc: (B, H, W, C) -> col: (B * OH * OW, KH * KW * C), ordered (b, oy, ox) by
    (ky, kx, c): one copy from a strided view (see _gather).
    """
    xp = backend.get_array_module(x_nhwc)
    b, h, w, c = x_nhwc.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    out = xp.empty((b, oh, ow, kh, kw, c), dtype=x_nhwc.dtype)
    return _gather(_pad(x_nhwc, padding), range(kh), kw, stride, oh, ow, out).reshape(b * oh * ow, -1)


def col2im(col: Any, x_shape_nhwc: tuple, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Adjoint of :func:`im2col`: scatter-add patches back to (B, H, W, C)."""
    xp = backend.get_array_module(col)
    b, h, w, c = x_shape_nhwc
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    out = xp.zeros((b, h + 2 * padding, w + 2 * padding, c), dtype=col.dtype)
    _scatter_add(out, col.reshape(b, oh, ow, kh, kw, c), range(kh), kw, stride, oh, ow)
    return out[:, padding : h + padding, padding : w + padding, :] if padding else out


def _geometry(x_nhwc: Any, w: Any, stride: int, padding: int) -> tuple[int, int]:
    o, c, kh, kw = w.shape
    if x_nhwc.shape[3] != c:
        raise ValueError(f"convolution expected {c} input channels, got {x_nhwc.shape[3]}")
    return (conv_output_size(x_nhwc.shape[1], kh, stride, padding),
            conv_output_size(x_nhwc.shape[2], kw, stride, padding))


def conv2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0,
                layout: str = "auto") -> Any:
    """Channels-last convolution: x (B, H, W, C), w (O, C, KH, KW), b (O,) -> (B, OH, OW, O).

    im2col and one matrix product per group of kernel rows (see _row_groups),
    summed; or, for small batches, one product with the weights as they are
    (``layout``, see _layout). No Python loop over the batch or pixels.
    """
    xp = backend.get_array_module(x_nhwc, w)
    o, c, kh, kw = w.shape
    oh, ow = _geometry(x_nhwc, w, stride, padding)
    if _layout(layout, x_nhwc.shape[0] * oh * ow, o, c) == "channels":
        y = _gather_channel_major(_pad(x_nhwc, padding), kh, kw, stride, oh, ow) @ w.reshape(o, -1).T
        if b is not None:
            y += b
        return y.reshape(x_nhwc.shape[0], oh, ow, o)
    w_rows = xp.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (KH, KW, C, O): the patch column order
    y = None
    for rows, _, col in _patch_groups(_pad(x_nhwc, padding), kh, kw, stride, oh, ow):
        part = col @ w_rows[rows.start : rows.stop].reshape(-1, o)
        if y is None:
            y = part
        else:
            y += part
    if b is not None:
        y += b
    return y.reshape(x_nhwc.shape[0], oh, ow, o)


def conv2d_nhwc_backward(
    grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int = 1, padding: int = 0, need_input_grad: bool = True,
    layout: str = "auto",
) -> tuple[Any | None, Any, Any]:
    """Gradients of :func:`conv2d_nhwc` w.r.t. (x, w, b); grad_y: (B, OH, OW, O).

    The patches are gathered again rather than kept from the forward pass, which
    would hold the whole patch matrix in memory between the two.
    """
    xp = backend.get_array_module(grad_y_nhwc, x_nhwc, w)
    o, c, kh, kw = w.shape
    oh, ow = _geometry(x_nhwc, w, stride, padding)
    g2 = grad_y_nhwc.reshape(-1, o)
    x_pad = _pad(x_nhwc, padding)
    if _layout(layout, g2.shape[0], o, c) == "channels":
        grad_w = (g2.T @ _gather_channel_major(x_pad, kh, kw, stride, oh, ow)).reshape(o, c, kh, kw)
        grad_x = None
        if need_input_grad:
            g_pad = xp.zeros(x_pad.shape, dtype=x_nhwc.dtype)
            gcol = (g2 @ w.reshape(o, -1)).reshape(x_nhwc.shape[0], oh, ow, c, kh, kw)
            _scatter_add_channel_major(g_pad, gcol, kh, kw, stride, oh, ow)
            h, wd = x_nhwc.shape[1:3]
            grad_x = g_pad[:, padding : h + padding, padding : wd + padding, :] if padding else g_pad
        return grad_x, grad_w, g2.sum(axis=0)
    w_rows = xp.ascontiguousarray(w.transpose(2, 3, 1, 0))
    grad_w_rows = xp.empty((kh, kw, c, o), dtype=w.dtype)
    g_pad = xp.zeros(x_pad.shape, dtype=x_nhwc.dtype) if need_input_grad else None
    for rows, buf, col in _patch_groups(x_pad, kh, kw, stride, oh, ow):
        grad_w_rows[rows.start : rows.stop] = (col.T @ g2).reshape(len(rows), kw, c, o)
        if need_input_grad:
            xp.matmul(g2, w_rows[rows.start : rows.stop].reshape(-1, o).T, out=col)
            _scatter_add(g_pad, buf, rows, kw, stride, oh, ow)
    grad_x = None
    if need_input_grad:
        h, wd = x_nhwc.shape[1:3]
        grad_x = g_pad[:, padding : h + padding, padding : wd + padding, :] if padding else g_pad
    return grad_x, grad_w_rows.transpose(3, 2, 0, 1), g2.sum(axis=0)


def _check_groups(groups: int, channels: int, out_channels: int, who: str = "convolution") -> None:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{who} groups must be an integer >= 1, got {groups!r}")
    if channels % groups or out_channels % groups:
        raise ValueError(f"{who} groups={groups} must divide both the input channels ({channels}) and the output "
                         f"channels ({out_channels}); pick a common divisor (groups=channels is depthwise)")


def grouped_conv2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0,
                        groups: int = 1) -> Any:
    """Grouped (``groups`` = C: depthwise) channels-last convolution.

    x (B, H, W, C), w (O, C / groups, KH, KW), b (O,) -> (B, OH, OW, O). Output channels
    [g O/G, (g+1) O/G) see only input channels [g C/G, (g+1) C/G), as in PyTorch.
    Patches in (c, ky, kx) column order, then one batched product over the groups, with
    the weights read in their own order.
    """
    xp = backend.get_array_module(x_nhwc, w)
    o, cg, kh, kw = w.shape
    n, c = x_nhwc.shape[0], x_nhwc.shape[3]
    _check_groups(groups, c, o)
    if cg * groups != c:
        raise ValueError(f"grouped convolution expected weights of shape ({o}, {c // groups}, KH, KW) for {c} input "
                         f"channels in {groups} groups, got {tuple(w.shape)}")
    oh, ow = conv_output_size(x_nhwc.shape[1], kh, stride, padding), conv_output_size(x_nhwc.shape[2], kw, stride,
                                                                                     padding)
    col = _gather_channel_major(_pad(x_nhwc, padding), kh, kw, stride, oh, ow)  # (N, C KH KW)
    col = col.reshape(-1, groups, cg * kh * kw).transpose(1, 0, 2)  # (G, N, Cg KH KW)
    y = xp.matmul(col, w.reshape(groups, o // groups, -1).transpose(0, 2, 1))  # (G, N, O/G)
    y = y.transpose(1, 0, 2).reshape(n, oh, ow, o)
    if b is not None:
        y += b
    return y


def grouped_conv2d_nhwc_backward(grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int = 1, padding: int = 0,
                                 groups: int = 1, need_input_grad: bool = True) -> tuple[Any | None, Any, Any]:
    """Gradients of :func:`grouped_conv2d_nhwc` w.r.t. (x, w, b); grad_y: (B, OH, OW, O)."""
    xp = backend.get_array_module(grad_y_nhwc, x_nhwc, w)
    o, cg, kh, kw = w.shape
    n, h, wd, c = x_nhwc.shape
    oh, ow = grad_y_nhwc.shape[1:3]
    x_pad = _pad(x_nhwc, padding)
    g = grad_y_nhwc.reshape(-1, groups, o // groups).transpose(1, 0, 2)  # (G, N, O/G)
    col = _gather_channel_major(x_pad, kh, kw, stride, oh, ow).reshape(-1, groups, cg * kh * kw).transpose(1, 0, 2)
    grad_w = xp.matmul(g.transpose(0, 2, 1), col).reshape(o, cg, kh, kw)
    grad_x = None
    if need_input_grad:
        gcol = xp.matmul(g, w.reshape(groups, o // groups, -1))  # (G, N, Cg KH KW)
        gcol = gcol.transpose(1, 0, 2).reshape(n, oh, ow, c, kh, kw)
        g_pad = xp.zeros(x_pad.shape, dtype=x_nhwc.dtype)
        _scatter_add_channel_major(g_pad, gcol, kh, kw, stride, oh, ow)
        grad_x = g_pad[:, padding : h + padding, padding : wd + padding, :] if padding else g_pad
    return grad_x, grad_w, grad_y_nhwc.reshape(-1, o).sum(axis=0)


def conv2d(x: Any, w: Any, b: Any | None = None, stride: int = 1, padding: int = 0, groups: int = 1) -> Any:
    """2-D cross-correlation. x: (B, C, H, W), w: (O, C / groups, KH, KW), b: (O,) -> (B, O, OH, OW)."""
    if groups != 1:
        return grouped_conv2d_nhwc(x.transpose(0, 2, 3, 1), w, b, stride, padding, groups).transpose(0, 3, 1, 2)
    return conv2d_nhwc(x.transpose(0, 2, 3, 1), w, b, stride, padding).transpose(0, 3, 1, 2)


def conv2d_backward(
    grad_out: Any, x: Any, w: Any, stride: int = 1, padding: int = 0, groups: int = 1
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv2d` w.r.t. (x, w, b); grad_out: (B, O, OH, OW)."""
    if groups != 1:
        gx, gw, gb = grouped_conv2d_nhwc_backward(grad_out.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1), w, stride,
                                                  padding, groups)
        return gx.transpose(0, 3, 1, 2), gw, gb
    gx, gw, gb = conv2d_nhwc_backward(grad_out.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1), w, stride, padding)
    return gx.transpose(0, 3, 1, 2), gw, gb


def conv2d_flops(height: int, width: int, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, *, training: bool = True, input_grad: bool = True,
                 algorithm: str = "im2col") -> int:
    """Flops (2 per multiply-add) of a convolution's matrix products for one image.

    The forward, and in training the weight gradient and (``input_grad``) the input
    gradient. ``algorithm="fourier"`` counts what the Fourier method executes
    instead of the direct convolution (:func:`~capsnet.layers.fourier.fourier_flops`;
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

    ``algorithm`` picks how the same map is computed: ``"im2col"`` (patches times
    the weight matrix), ``"fourier"`` (per-frequency products, see
    :mod:`capsnet.layers.fourier`) or ``"auto"``, which takes the Fourier method
    when it saves more flops over the batch than the weights' transform costs
    (see :meth:`algorithm_for`; PrimaryCaps' 9x9 stride-2 convolution needs 0.35
    of the direct flops per image), and im2col otherwise (conv1, with one input
    channel; training batches under 8). Both agree to rounding; the attribute may
    be changed between steps.

    ``groups=G`` splits the channels into G groups convolved separately (weights
    (O, C / G, KH, KW), bound +-1/sqrt(C/G*KH*KW)); ``groups=in_channels`` is a depthwise
    convolution. Grouped convolutions always take the patch route of
    :func:`grouped_conv2d_nhwc`.
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
        self._fourier = FourierConv()  # the Fourier method's memory between calls (Module.release frees it)
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("stride", stride, 1),
            ("padding", padding, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Conv2d {name} must be an integer >= {low}, got {value!r}")
        _check_groups(groups, in_channels, out_channels, "Conv2d")
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

    def algorithm_for(self, height: int, width: int, batch: int) -> str:
        """The method used for a batch of height x width inputs: "im2col" or "fourier".

        "auto" asks :func:`~capsnet.layers.fourier.fourier_pays_off`, which weighs the
        flops the Fourier method saves over the batch against transforming the weights
        (in training, every call) or checking that they are unchanged (in inference).
        On the 2-core test machine it picks Fourier for PrimaryCaps in training from
        batch 8 and in inference from batch 4 (below, the direct method reads the
        weights in place and costs less than checking the cached spectrum).
        """
        if self.groups != 1:
            return "im2col"
        if self.algorithm != "auto":
            return self.algorithm
        k, p = self.kernel_size, self.padding
        return "fourier" if fourier_pays_off(height + 2 * p, width + 2 * p, self.in_channels, self.out_channels,
                                             k, self.stride, batch, training=self.training,
                                             input_grad=self.input_grad) else "im2col"

    def share_with_replica(self, replica: "Conv2d") -> Any:
        """Let ``replica`` (this layer in a copy of the model, :mod:`capsnet.replicas`) share
        this layer's weight spectrum; returns the holder, opened and closed around each step."""
        return self._fourier.share_weight_spectrum(replica._fourier)

    def _release_scratch(self) -> None:
        self._fourier.release()

    def _scratch_nbytes(self) -> int:
        return self._fourier.nbytes

    def forward_nhwc(self, x_nhwc: Any) -> Any:
        """(B, H, W, C) -> (B, OH, OW, O), for layers that stay channels-last."""
        check_input(type(self).__name__, x_nhwc, (None, None, None, self.in_channels), self.weight.dtype,
                    "channels-last input")
        b = self.bias.data if self.bias is not None else None
        backend.get_array_module(x_nhwc, self.weight.data)
        conv_output_size(x_nhwc.shape[1], self.kernel_size, self.stride, self.padding)
        conv_output_size(x_nhwc.shape[2], self.kernel_size, self.stride, self.padding)
        if self.groups != 1:
            self._save("grouped", x_nhwc)
            return grouped_conv2d_nhwc(x_nhwc, self.weight.data, b, self.stride, self.padding, self.groups)
        if self.training:
            self._fourier.start_training()  # memory kept by inference calls goes back before a training step
        if self.algorithm_for(x_nhwc.shape[1], x_nhwc.shape[2], x_nhwc.shape[0]) == "fourier":
            y, saved = self._fourier.forward(x_nhwc, self.weight.data, b, self.stride, self.padding, self.training)
            self._save("fourier", saved)
            return y
        self._save("im2col", x_nhwc)
        return conv2d_nhwc(x_nhwc, self.weight.data, b, self.stride, self.padding)

    def backward_nhwc(self, grad_y: Any) -> Any:
        method, saved = self._pop()
        if method == "grouped":
            gx, gw, gb = grouped_conv2d_nhwc_backward(grad_y, saved, self.weight.data, self.stride, self.padding,
                                                      self.groups, self.input_grad)
        else:
            args = (grad_y, saved, self.weight.data, self.stride, self.padding, self.input_grad)
            gx, gw, gb = self._fourier.backward(*args) if method == "fourier" else conv2d_nhwc_backward(*args)
        self.weight.grad += gw
        if self.bias is not None:
            self.bias.grad += gb
        return gx

    def forward(self, x: Any) -> Any:
        check_input(type(self).__name__, x, (None, self.in_channels, None, None), self.weight.dtype)
        xp = backend.get_array_module(x, self.weight.data)
        return self.forward_nhwc(xp.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        xp = backend.get_array_module(grad_out)
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


def conv_transpose2d_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0,
                          output_padding: int = 0) -> Any:
    """Channels-last transposed convolution, the adjoint of :func:`conv2d_nhwc` in x.

    x (B, H, W, Cin), w (Cin, Cout, KH, KW) (PyTorch's layout), b (Cout,) -> (B, HO, WO, Cout)
    with HO = (H - 1) stride - 2 padding + KH + output_padding: each input pixel's
    product with the kernel is added into the output (one GEMM, then col2im).
    """
    xp = backend.get_array_module(x_nhwc, w)
    cin, cout, kh, kw = w.shape
    ho, wo = _transpose_geometry(tuple(x_nhwc.shape), w, stride, padding, output_padding)
    w_mat = xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cin, kh * kw * cout)
    col = x_nhwc.reshape(-1, cin) @ w_mat  # (B*H*W, KH*KW*Cout), the patch order of im2col
    y = col2im(col, (x_nhwc.shape[0], ho, wo, cout), kh, kw, stride, padding)
    if b is not None:
        y = y + b
    return y


def conv_transpose2d_nhwc_backward(grad_y_nhwc: Any, x_nhwc: Any, w: Any, stride: int = 1,
                                   padding: int = 0) -> tuple[Any, Any, Any]:
    """Gradients of :func:`conv_transpose2d_nhwc` w.r.t. (x, w, b); grad_y: (B, HO, WO, Cout).
    The input gradient is a plain convolution of grad_y with the same kernel."""
    xp = backend.get_array_module(grad_y_nhwc, x_nhwc, w)
    cin, cout, kh, kw = w.shape
    col = im2col(grad_y_nhwc, kh, kw, stride, padding)  # (B*H*W, KH*KW*Cout)
    w_mat = xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cin, kh * kw * cout)
    gx = (col @ w_mat.T).reshape(x_nhwc.shape)
    gw = (x_nhwc.reshape(-1, cin).T @ col).reshape(cin, kh, kw, cout).transpose(0, 3, 1, 2)
    return gx, gw, grad_y_nhwc.reshape(-1, cout).sum(axis=0)


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
    "grouped_conv2d_nhwc",
    "grouped_conv2d_nhwc_backward",
    "im2col",
]
