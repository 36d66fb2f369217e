"""The patch layout every algorithm shares: im2col (a gather of kernel-offset patches),
its adjoint col2im (on a GPU one index gather and one sum instead of KH*KW slice additions,
see sum_method), and the public ``im2col``/``col2im`` pair.

The patch matrix of a channels-last batch x (B, H, W, C) has one row per output pixel,
ordered (b, oy, ox), and one column per kernel tap and channel, ordered (ky, kx, c): every
copy moves whole contiguous channel vectors. Small batches can order the columns
(c, ky, kx) instead, the weights' own order (``gather_channel_major``), so a product reads
the weights in place; :mod:`.im2col` measures which pays.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from capsnet import backend
from capsnet.layers.base import conv_output_size

__all__ = ["SUM_METHODS", "col2im", "gather", "gather_channel_major", "gather_taps", "im2col", "pad",
           "patch_gradient_buffer", "patch_gradient_sum", "patch_view", "row_groups", "sum_method"]


def pad(x_nhwc: Any, padding: int) -> Any:
    """x (B, H, W, C) with ``padding`` zeros on each side of H and W."""
    if not padding:
        return x_nhwc
    xp = backend.get_array_module(x_nhwc)
    return xp.pad(x_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def crop(x_pad: Any, padding: int) -> Any:
    """The inverse of :func:`pad` (a view)."""
    if not padding:
        return x_pad
    return x_pad[:, padding : x_pad.shape[1] - padding, padding : x_pad.shape[2] - padding]


def row_groups(kh: int, kw: int, c: int, min_depth: int = 1024) -> list[range]:
    """Kernel rows taken together so each partial product has depth >= min_depth.

    A whole im2col of PrimaryCaps' input would be 300 MB at batch 100; one kernel row at a
    time (depth KW*C = 2304) keeps the products deep enough for the BLAS with a ninth of the
    memory. Conv1 (C = 1) takes all rows at once.
    """
    rows = min(kh, max(1, -(-min_depth // (kw * c))))
    return [range(start, min(start + rows, kh)) for start in range(0, kh, rows)]


def patch_view(x_pad: Any, rows: range, kw: int, stride: int, oh: int, ow: int) -> Any:
    """A strided view (no copy) of x_pad (B, Hp, Wp, C): (B, OH, OW, len(rows), KW, C), in
    which the patch of output pixel (b, oy, ox) starts at row rows.start + stride*oy."""
    xp = backend.get_array_module(x_pad)
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.strides
    return xp.lib.stride_tricks.as_strided(
        x_pad[:, rows.start :], shape=(b, oh, ow, len(rows), kw, c),
        strides=(sb, stride * sh, stride * sw, sh, sw, sc),
    )


def gather(x_pad: Any, rows: range, kw: int, stride: int, oh: int, ow: int, out: Any | None = None) -> Any:
    """Patches of kernel rows ``rows``: (B, OH, OW, len(rows), KW, C), one copy."""
    view = patch_view(x_pad, rows, kw, stride, oh, ow)
    if out is None:
        return backend.get_array_module(x_pad).ascontiguousarray(view)
    out[...] = view
    return out


def gather_taps(x_pad: Any, kh: int, kw: int, stride: int, oh: int, ow: int, ones: bool = False) -> Any:
    """Patches transposed: (C * KH * KW, B * OH * OW), rows ordered (c, ky, kx) (the weights'
    own order), one copy. Each run it copies is a row of OW outputs, where the other layouts
    copy runs of C or KW values: for inputs of one or a few channels (a network's first layer).

    With ``ones``, one more row of ones at the end, (C * KH * KW + 1, B * OH * OW): against
    the bias as one more column of the weights it adds the bias inside the forward's product,
    and times the output gradient it gives the bias gradient inside the weight gradient's."""
    xp = backend.get_array_module(x_pad)
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(
        x_pad, shape=(c, kh, kw, b, oh, ow), strides=(sc, sh, sw, sb, stride * sh, stride * sw))
    if not ones:
        return xp.ascontiguousarray(view).reshape(c * kh * kw, -1)
    depth = c * kh * kw
    out = xp.empty((depth + 1, b * oh * ow), dtype=x_pad.dtype)
    out[:depth].reshape(c, kh, kw, b, oh, ow)[...] = view
    out[depth] = 1
    return out


def gather_channel_major(x_pad: Any, kh: int, kw: int, stride: int, oh: int, ow: int) -> Any:
    """Patches (B * OH * OW, C * KH * KW), columns ordered (c, ky, kx): one copy."""
    xp = backend.get_array_module(x_pad)
    b, _, _, c = x_pad.shape
    sb, sh, sw, sc = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(
        x_pad, shape=(b, oh, ow, c, kh, kw), strides=(sb, stride * sh, stride * sw, sc, sh, sw))
    return xp.ascontiguousarray(view).reshape(b * oh * ow, -1)


@functools.lru_cache(maxsize=64)
def _taps_1d(size: int, out: int, taps: range, stride: int) -> np.ndarray:
    """(size, T) for one axis: for padded position u, the (o * len(taps) + t) of every
    (output o, kernel tap taps[t]) with stride * o + taps[t] == u, or -1 in unused slots.

    The outputs reaching one position are consecutive and at most T = min(ceil(len(taps) /
    stride), out) of them, so slot o mod T is free for each."""
    slots = min(-(-len(taps) // stride), out)
    table = np.full((size, slots), -1, dtype=np.int64)
    o = np.arange(out)
    for t, tap in enumerate(taps):  # a loop over kernel taps
        table[stride * o + tap, o % slots] = o * len(taps) + t
    return table


@functools.lru_cache(maxsize=64)
def _host_index(batch: int, hp: int, wp: int, oh: int, ow: int, rows: range, kw: int, stride: int) -> np.ndarray:
    """(B, Hp, Wp, Ty*Tx) row indices into a patch gradient (B, OH, OW, len(rows), KW, C)
    seen as rows of C, followed by one zero row, which the unused slots point at."""
    kh = len(rows)
    ty, tx = _taps_1d(hp, oh, rows, stride), _taps_1d(wp, ow, range(kw), stride)
    oy, ky = np.divmod(ty, kh)
    ox, kx = np.divmod(tx, kw)
    per_image = oh * ow * kh * kw
    flat = ((oy[:, None, :, None] * ow + ox[None, :, None, :]) * kh + ky[:, None, :, None]) * kw + kx[None, :, None, :]
    valid = (ty[:, None, :, None] >= 0) & (tx[None, :, None, :] >= 0)
    flat = np.where(valid, flat, -1).reshape(hp, wp, -1)
    index = flat[None] + per_image * np.arange(batch)[:, None, None, None]
    index[:, flat < 0] = batch * per_image
    return index.astype(np.intp)


_DEVICE_INDEX: dict = {}


def _index(xp: Any, batch: int, hp: int, wp: int, oh: int, ow: int, rows: range, kw: int, stride: int) -> Any:
    key = (*backend.device_key(xp), batch, hp, wp, oh, ow, rows.start, rows.stop, kw, stride)
    index = _DEVICE_INDEX.get(key)
    if index is None:
        if len(_DEVICE_INDEX) >= 64:  # ever-changing sizes: start over rather than grow
            _DEVICE_INDEX.clear()
        index = _DEVICE_INDEX[key] = xp.asarray(_host_index(batch, hp, wp, oh, ow, rows, kw, stride))
    return index


def patch_gradient_buffer(xp: Any, rows: int, cols: int, channels: int, dtype: Any) -> tuple[Any, Any]:
    """(buffer, patch-gradient matrix): the matrix (rows, cols) is the front of the buffer,
    followed by one zero row of ``channels`` for :func:`patch_gradient_sum`."""
    buf = xp.empty(rows * cols + channels, dtype=dtype)
    buf[rows * cols :] = 0
    return buf, buf[: rows * cols].reshape(rows, cols)


SUM_METHODS = ("auto", "gather", "offsets")
"""How the patch-gradient sum may be done: one index gather, or a slice addition per kernel offset."""


def sum_method(xp: Any, method: str = "auto") -> str:
    """How :func:`patch_gradient_sum` runs: "gather" (one index gather and one sum: two
    launches whatever the kernel) on a GPU, where each launch costs 5-20 us; "offsets" (a
    slice addition per kernel offset, each value written once) on NumPy, where a call costs
    a microsecond but the gather writes every padded pixel's ceil(K/s)^2 slots, most of them
    zero at a 9x9 stride-2 kernel on a 6x6 output (measured at PrimaryCaps' batch 8 on the
    2-core machine: 21 ms by offsets, 77 ms by the gather, 284 ms by numpy.add.at)."""
    if method not in SUM_METHODS:
        raise ValueError(f"patch-gradient sum method must be one of {SUM_METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "offsets" if backend.device_key(xp)[0] == "numpy" else "gather"


def patch_gradient_sum(buf: Any, shape_pad: tuple, oh: int, ow: int, rows: range, kw: int, stride: int,
                       out: Any | None = None, method: str = "auto") -> Any:
    """The adjoint of :func:`gather`: sum each padded input pixel's patch gradients.

    ``buf`` holds the patch gradient of kernel rows ``rows``, (B, OH, OW, len(rows), KW, C),
    followed by C zeros (see :func:`patch_gradient_buffer`). Returns the gradient of the
    padded input (B, Hp, Wp, C) from those rows, added into ``out`` when given. By
    :func:`sum_method`: one index gather of the <= ceil(KH/s) * ceil(KW/s) taps that reach
    each pixel and one sum over them, or one slice addition per kernel offset.
    """
    xp = backend.get_array_module(buf)
    b, hp, wp, c = shape_pad
    if sum_method(xp, method) == "offsets":
        gcol = buf[: b * oh * ow * len(rows) * kw * c].reshape(b, oh, ow, len(rows), kw, c)
        if out is None:
            out = xp.zeros(shape_pad, dtype=buf.dtype)
        for a, ky in enumerate(rows):  # a loop over kernel offsets
            ys = slice(ky, ky + stride * oh, stride)
            for kx in range(kw):
                out[:, ys, kx : kx + stride * ow : stride] += gcol[:, :, :, a, kx]
        return out
    index = _index(xp, b, hp, wp, oh, ow, rows, kw, stride)
    taps = xp.take(buf.reshape(-1, c), index, axis=0)  # (B, Hp, Wp, T, C)
    total = taps.reshape(b, hp, wp, c) if taps.shape[3] == 1 else taps.sum(axis=3)
    if out is None:
        return total
    out += total
    return out


def im2col(x_nhwc: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Patches of a channels-last batch.

    x_nhwc: (B, H, W, C) -> col: (B * OH * OW, KH * KW * C), rows ordered (b, oy, ox),
    columns (ky, kx, c): one copy from a strided view.
    """
    b, h, w, c = x_nhwc.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    return gather(pad(x_nhwc, padding), range(kh), kw, stride, oh, ow).reshape(b * oh * ow, -1)


def col2im(col: Any, x_shape_nhwc: tuple, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Adjoint of :func:`im2col`: each pixel of x (B, H, W, C) gets the sum of its patch
    entries in col (B * OH * OW, KH * KW * C), by one gather (see patch_gradient_sum)."""
    xp = backend.get_array_module(col)
    b, h, w, c = x_shape_nhwc
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    if col.shape != (b * oh * ow, kh * kw * c):
        raise ValueError(f"col2im expected patches of shape {(b * oh * ow, kh * kw * c)} for input {x_shape_nhwc}, "
                         f"kernel {kh}x{kw}, stride {stride}, padding {padding}; got {tuple(col.shape)}")
    buf, front = patch_gradient_buffer(xp, b * oh * ow, kh * kw * c, c, col.dtype)
    front[...] = col
    g_pad = patch_gradient_sum(buf, (b, h + 2 * padding, w + 2 * padding, c), oh, ow, range(kh), kw, stride)
    return crop(g_pad, padding)
