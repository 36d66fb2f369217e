"""Im2col: patches (the shared layout of :mod:`.patches`) times the weight matrix, for any
geometry; grouped convolutions as one product batched over the groups."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from capsnet import backend
from capsnet.layers.convolution.algorithm import Algorithm
from capsnet.layers.convolution.geometry import ConvGeometry
from capsnet.layers.convolution.patches import (
    crop, gather, gather_channel_major, gather_taps, pad, patch_gradient_buffer, patch_gradient_sum, row_groups)
from capsnet.parallel import run_shards

__all__ = ["LAYOUTS", "Im2col", "Im2colSaved", "layout_for"]

LAYOUTS = ("auto", "rows", "channels", "taps")
"""The patch-column orders im2col can use (see :func:`layout_for`)."""


class Im2colSaved(NamedTuple):
    """What im2col's backward needs from its forward."""

    x_pad: Any  # the padded input (B, Hp, Wp, C): patches are gathered again, not kept


def layout_for(g: ConvGeometry, layout: str = "auto") -> str:
    """The column order of the patch matrix.

    "rows": (ky, kx, c), gathered a group of kernel rows at a time (row_groups), whole
    channel vectors per copy; the weights are brought to that order on each call.
    "channels": (c, ky, kx), the weights' own order, so no weight-sized copy; its gather
    moves single values, which costs less than that copy only while the patch matrix is no
    larger than the weights (rows <= O). Grouped convolutions always take "channels".
    "taps": the "channels" order stored transposed, (C KH KW, N), gathered a row of outputs
    per copy, with a row of ones that carries the bias through the products; taken for one
    input channel (a network's first layer), where the other orders copy runs of KW values.
    Against "rows" on the first layers of the five networks (32 and 256 outputs, batch 1 to
    100, 1 and 2 threads; quiet, one process, ``scripts/results/first-layers-ab-2core.json``):
    faster in all 60 forward and weight-gradient rows, up to 2.6x. The input
    gradient takes the "rows" path (one product straight into the patch gradient)."""
    if layout not in LAYOUTS:
        raise ValueError(f"convolution layout must be one of {LAYOUTS}, got {layout!r}")
    if g.groups != 1:
        return "channels"
    if layout != "auto":
        return layout
    if g.in_channels == 1:
        return "taps"
    return "channels" if g.in_channels > 1 and g.rows <= g.out_channels else "rows"


class Im2col(Algorithm):
    """im2col + GEMM. The input gradient is one product into the patch gradient and its
    gather-sum back to the pixels (:func:`~.patches.patch_gradient_sum`)."""

    name = "im2col"

    def __init__(self, layout: str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"convolution layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, Im2colSaved]:
        xp = backend.get_array_module(x_nhwc, w)
        x_pad = pad(x_nhwc, g.padding)
        o, kh, kw, oh, ow = g.out_channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w
        layout = layout_for(g, self.layout)
        if layout == "taps":  # (N, C KH KW [+ 1]) (C KH KW [+ 1], O): the bias, if any, inside the product
            w2 = w.reshape(o, -1) if b is None else xp.concatenate([w.reshape(o, -1), b.reshape(o, 1)], axis=1)
            if xp is not np:
                y = gather_taps(x_pad, kh, kw, g.stride, oh, ow, ones=b is not None).T @ w2.T
                return y.reshape(g.batch, oh, ow, o), Im2colSaved(x_pad)
            y = np.empty((g.batch, oh, ow, o), dtype=x_nhwc.dtype)

            def images(lo: int, hi: int) -> None:  # a share of the images per host thread (run_shards)
                patches = gather_taps(x_pad[lo:hi], kh, kw, g.stride, oh, ow, ones=b is not None)
                np.matmul(patches.T, w2.T, out=y[lo:hi].reshape(-1, o))

            run_shards(g.batch, images)
            return y, Im2colSaved(x_pad)
        elif layout == "channels":
            col = gather_channel_major(x_pad, kh, kw, g.stride, oh, ow)  # (N, C KH KW)
            if g.groups == 1:
                y = col @ w.reshape(o, -1).T
            else:
                gs = g.groups
                col = col.reshape(-1, gs, g.depth).transpose(1, 0, 2)  # (G, N, Cg KH KW)
                y = xp.matmul(col, w.reshape(gs, o // gs, -1).transpose(0, 2, 1))  # (G, N, O/G)
                y = y.transpose(1, 0, 2).reshape(-1, o)
        else:
            w_rows = xp.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (KH, KW, C, O): the column order
            y, buf = None, None
            for rows in row_groups(kh, kw, g.in_channels):
                if buf is None or buf.shape[3] != len(rows):
                    buf = xp.empty((g.batch, oh, ow, len(rows), kw, g.in_channels), dtype=x_nhwc.dtype)
                gather(x_pad, rows, kw, g.stride, oh, ow, buf)
                part = buf.reshape(g.rows, -1) @ w_rows[rows.start : rows.stop].reshape(-1, o)
                if y is None:
                    y = part
                else:
                    y += part
        if b is not None:
            y += b
        return y.reshape(g.batch, oh, ow, o), Im2colSaved(x_pad)

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> Im2colSaved:
        return Im2colSaved(pad(x_nhwc, g.padding))

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: Im2colSaved, w: Any) -> Any:
        xp = backend.get_array_module(grad_y, w)
        o, c, kh, kw, oh, ow = g.out_channels, g.in_channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w
        g2 = grad_y.reshape(-1, o)
        layout = layout_for(g, self.layout)
        if layout == "taps":
            return xp.ascontiguousarray(self._taps_gradients(g, grad_y, saved, ones=False).T).reshape(w.shape)
        if layout == "channels":
            col = gather_channel_major(saved.x_pad, kh, kw, g.stride, oh, ow)
            if g.groups == 1:
                return (g2.T @ col).reshape(w.shape)
            gs = g.groups
            col = col.reshape(-1, gs, g.depth).transpose(1, 0, 2)  # (G, N, Cg KH KW)
            gg = g2.reshape(-1, gs, o // gs).transpose(1, 2, 0)  # (G, O/G, N)
            return xp.matmul(gg, col).reshape(w.shape)
        grad_w_rows = xp.empty((kh, kw, c, o), dtype=w.dtype)
        buf = None
        for rows in row_groups(kh, kw, c):
            if buf is None or buf.shape[3] != len(rows):
                buf = xp.empty((g.batch, oh, ow, len(rows), kw, c), dtype=w.dtype)
            gather(saved.x_pad, rows, kw, g.stride, oh, ow, buf)
            grad_w_rows[rows.start : rows.stop] = (buf.reshape(g.rows, -1).T @ g2).reshape(len(rows), kw, c, o)
        return grad_w_rows.transpose(3, 2, 0, 1)

    def backward(self, g: ConvGeometry, grad_y: Any, saved: Im2colSaved, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """(grad_x or None, grad_w, grad_b); in the "taps" layout the bias gradient comes out of
        the weight gradient's product, as one more row of the patches (ones)."""
        if layout_for(g, self.layout) != "taps":
            return super().backward(g, grad_y, saved, w, need_input_grad)
        xp = backend.get_array_module(grad_y, w)
        gx = self.input_grad(g, grad_y, saved, w) if need_input_grad else None
        both = self._taps_gradients(g, grad_y, saved, ones=True)  # (C KH KW + 1, O)
        return gx, xp.ascontiguousarray(both[:-1].T).reshape(w.shape), both[-1].copy()

    @staticmethod
    def _taps_gradients(g: ConvGeometry, grad_y: Any, saved: Im2colSaved, ones: bool,
                        channels_first: bool = False) -> Any:
        """(C KH KW [+ 1], O): the patches (and ones) times grad_y, (B, OH, OW, O), or with
        ``channels_first`` (B, O, OH, OW) memory, one product per image. On NumPy a share of
        the images per host thread (:func:`~capsnet.parallel.run_shards`), the shares' products
        added in order."""
        xp = backend.get_array_module(grad_y)
        o, p = g.out_channels, g.out_h * g.out_w

        def images(lo: int, hi: int) -> Any:
            patches = gather_taps(saved.x_pad[lo:hi], g.kernel_h, g.kernel_w, g.stride, g.out_h, g.out_w, ones=ones)
            if not channels_first:
                return patches @ grad_y[lo:hi].reshape(-1, o)
            per_image = xp.matmul(grad_y[lo:hi].reshape(hi - lo, o, p), patches.reshape(-1, hi - lo, p).transpose(1, 2, 0))
            return per_image.sum(axis=0).T  # (B, O, K [+ 1]) summed -> (K [+ 1], O)

        parts = run_shards(g.batch, images) if xp is np else [images(0, g.batch)]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def gradients_channels_first(self, g: ConvGeometry, grad_y_nchw: Any, saved: Im2colSaved, w: Any
                                 ) -> tuple[Any, Any]:
        """(grad_w, grad_b) in the "taps" layout from an output gradient in channels-first
        memory, (B, O, OH, OW) C-contiguous, as a caller of ``Conv2d.backward`` with its own
        NCHW arrays passes it: one product per image, (O, OH OW) times that image's patches and
        ones, summed over the images, with no channels-last copy of the gradient (1.3x to 2x
        faster than that copy and one product on the first layers, one process, ad hoc)."""
        xp = backend.get_array_module(grad_y_nchw, w)
        if layout_for(g, self.layout) != "taps":
            raise ValueError(f"gradients_channels_first needs the taps layout, not {layout_for(g, self.layout)!r}")
        both = self._taps_gradients(g, grad_y_nchw, saved, ones=True, channels_first=True)  # (K + 1, O)
        return xp.ascontiguousarray(both[:-1].T).reshape(w.shape), both[-1].copy()

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        xp = backend.get_array_module(grad_y, w)
        o, c, kh, kw, oh, ow = g.out_channels, g.in_channels, g.kernel_h, g.kernel_w, g.out_h, g.out_w
        g2 = grad_y.reshape(-1, o)
        shape_pad = (g.batch, g.padded_h, g.padded_w, c)
        if layout_for(g, self.layout) == "channels":
            buf, gcol = patch_gradient_buffer(xp, g.rows, kh * kw * c, c, w.dtype)
            gcol6 = gcol.reshape(g.batch, oh, ow, kh, kw, c)
            if g.groups == 1:
                part = (g2 @ w.reshape(o, -1)).reshape(g.batch, oh, ow, c, kh, kw)
                gcol6[...] = part.transpose(0, 1, 2, 4, 5, 3)
            else:
                gs, cg = g.groups, c // g.groups
                part = xp.matmul(g2.reshape(-1, gs, o // gs).transpose(1, 0, 2), w.reshape(gs, o // gs, -1))
                part = part.reshape(gs, g.batch, oh, ow, cg, kh, kw)  # (G, B, OH, OW, Cg, KH, KW)
                gcol6.reshape(g.batch, oh, ow, kh, kw, gs, cg)[...] = part.transpose(1, 2, 3, 5, 6, 0, 4)
            return crop(patch_gradient_sum(buf, shape_pad, oh, ow, range(kh), kw, g.stride), g.padding)
        w_rows = xp.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (KH, KW, C, O)
        grad_pad = None
        for rows in row_groups(kh, kw, c):
            buf, gcol = patch_gradient_buffer(xp, g.rows, len(rows) * kw * c, c, w.dtype)
            xp.matmul(g2, w_rows[rows.start : rows.stop].reshape(-1, o).T, out=gcol)
            grad_pad = patch_gradient_sum(buf, shape_pad, oh, ow, rows, kw, g.stride, out=grad_pad)
        return crop(grad_pad, g.padding)
