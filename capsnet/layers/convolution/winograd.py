"""Winograd F(2x2, 3x3) (Lavin and Gray, 2016) for 3x3, stride-1, ungrouped convolutions.

The output is cut into 2x2 tiles; each is computed from the 4x4 input tile under it with
16 multiplications per (input, output) channel pair instead of 36:

    Y = A^T [(G w G^T) * (B^T d B)] A

for a 4x4 input tile d, a 3x3 kernel w and the constant matrices below. The transforms are
linear maps of the 16 tile entries, so over a batch they are three matrix products with
16-long inner dimensions, and the channel sums are 16 independent products, one per tile
entry (the "frequency" xi):

- input:  V[xi, t, c] = sum_k BB[xi, k] D[k, t, c]      D: the 4x4 tiles (16, T, C), stride 2
- kernel: U[xi, c, o] = sum_k GG[xi, k] w[k, c, o]      w read as (9, C, O)
- output: M[xi] = V[xi] U[xi], (T, C) x (C, O);  Y[q, t, o] = sum_xi AA[q, xi] M[xi, t, o]

with BB = B^T (x) B^T (16 x 16), GG = G (x) G (16 x 9) and AA = A^T (x) A^T (4 x 16), Kronecker
products acting on row-major flattened tiles. The channel products do 16/36 = 4/9 of the
direct method's multiplications.

Backward, with the same layout:

- weight gradient: dM[xi] = sum_q AA[q, xi] dY[q] (the adjoint of the output transform),
  dU[xi] = V[xi]^T dM[xi], (C, T) x (T, O), and dw = GG^T dU: V is what the forward keeps;
- input gradient: the adjoint of the forward from the same dM: dV[xi] = dM[xi] U[xi]^T,
  (T, O) x (O, C), dD = BB^T dV, and each 4x4 tile's gradient added back where the tile
  was read (16 strided slice additions; neighbouring tiles overlap by two rows or columns).

Float32 rounding: the transforms' entries are 0, +-1/2 and +-1, so the method loses little
to the direct one (the tests compare both in float64 to 1e-10 and the gradients by a float64
gradient check).
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from capsnet import backend
from capsnet.layers.convolution.algorithm import Algorithm, bias_grad
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["Winograd", "WinogradSaved", "winograd_flops"]

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
_HOST = {"BB": np.kron(_BT, _BT), "GG": np.kron(_G, _G), "AA": np.kron(_AT, _AT)}  # 16x16, 16x9, 4x16

_matrices_lock = threading.Lock()
_DEVICE: dict[tuple, dict[str, Any]] = {}


def _matrices(xp: Any, dtype: Any) -> dict[str, Any]:
    """BB, GG, AA (and their transposes, contiguous) on the device of ``xp``, in ``dtype``."""
    key = (*backend.device_key(xp), np.dtype(dtype).name)
    found = _DEVICE.get(key)
    if found is None:
        with _matrices_lock:
            found = _DEVICE.setdefault(key, {
                **{name: xp.asarray(m.astype(dtype)) for name, m in _HOST.items()},
                **{name + "T": xp.asarray(np.ascontiguousarray(m.T).astype(dtype)) for name, m in _HOST.items()}})
    return found


class WinogradSaved(NamedTuple):
    """What the weight gradient needs from the forward."""

    V: Any  # the transformed input tiles (16, T, C); None after an inference forward
    tiles: tuple  # (th, tw): output tiles per column and per row


def _tiles(g: ConvGeometry) -> tuple[int, int]:
    return -(-g.out_h // 2), -(-g.out_w // 2)


def _input_transform(g: ConvGeometry, x_nhwc: Any) -> tuple[Any, tuple[int, int]]:
    """(V (16, T, C), (th, tw)): the 4x4 input tiles under each 2x2 output tile, T = B th tw
    ordered (b, ty, tx), gathered from the zero-padded input (one copy) and transformed by BB."""
    xp = backend.get_array_module(x_nhwc)
    th, tw = _tiles(g)
    b, h, w, c = x_nhwc.shape
    p = g.padding
    hn, wn = 2 * th + 2, 2 * tw + 2  # the padded extent the tiles cover: one more row/column when odd
    x_pad = xp.pad(x_nhwc, ((0, 0), (p, hn - h - p), (p, wn - w - p), (0, 0)))
    sb, sh, sw, sc = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(x_pad, shape=(4, 4, b, th, tw, c),
                                           strides=(sh, sw, sb, 2 * sh, 2 * sw, sc))
    d = xp.ascontiguousarray(view).reshape(16, -1)
    V = xp.matmul(_matrices(xp, x_nhwc.dtype)["BB"], d)
    return V.reshape(16, b * th * tw, c), (th, tw)


def _kernel_transform(w: Any) -> Any:
    """U (16, C, O) from w (O, C, 3, 3)."""
    xp = backend.get_array_module(w)
    o, c = w.shape[:2]
    w9 = xp.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9, c * o)
    return xp.matmul(_matrices(xp, w.dtype)["GG"], w9).reshape(16, c, o)


def _output_transform(M: Any, g: ConvGeometry, th: int, tw: int) -> Any:
    """y (B, OH, OW, O), contiguous, from the tile products M (16, T, O)."""
    xp = backend.get_array_module(M)
    o = M.shape[2]
    q = xp.matmul(_matrices(xp, M.dtype)["AA"], M.reshape(16, -1))  # (4, T O)
    tiles = q.reshape(2, 2, g.batch, th, tw, o).transpose(2, 3, 0, 4, 1, 5).reshape(g.batch, 2 * th, 2 * tw, o)
    y = xp.empty((g.batch, g.out_h, g.out_w, o), dtype=M.dtype)
    y[...] = tiles[:, : g.out_h, : g.out_w]
    return y


def _output_tiles_adjoint(grad_y: Any, g: ConvGeometry, th: int, tw: int) -> Any:
    """dM (16, T, O): the adjoint of :func:`_output_transform` applied to grad_y (B, OH, OW, O)."""
    xp = backend.get_array_module(grad_y)
    b, oh, ow, o = grad_y.shape
    padded = xp.zeros((b, 2 * th, 2 * tw, o), dtype=grad_y.dtype) if (oh, ow) != (2 * th, 2 * tw) else None
    if padded is not None:
        padded[:, :oh, :ow] = grad_y
        grad_y = padded
    tiles = xp.ascontiguousarray(grad_y.reshape(b, th, 2, tw, 2, o).transpose(2, 4, 0, 1, 3, 5)).reshape(4, -1)
    return xp.matmul(_matrices(xp, grad_y.dtype)["AAT"], tiles).reshape(16, b * th * tw, o)


def _input_transform_adjoint(dV: Any, g: ConvGeometry, th: int, tw: int) -> Any:
    """The input gradient (B, H, W, C), contiguous, from dV (16, T, C): the adjoint of
    :func:`_input_transform` (BB^T, then each tile's 16 entries added where they were read)."""
    xp = backend.get_array_module(dV)
    c, p = dV.shape[2], g.padding
    dD = xp.matmul(_matrices(xp, dV.dtype)["BBT"], dV.reshape(16, -1)).reshape(4, 4, g.batch, th, tw, c)
    grad_pad = xp.zeros((g.batch, 2 * th + 2, 2 * tw + 2, c), dtype=dV.dtype)
    for r in range(4):  # a loop over the 16 tile entries
        for s in range(4):
            grad_pad[:, r : r + 2 * th : 2, s : s + 2 * tw : 2] += dD[r, s]
    return xp.ascontiguousarray(grad_pad[:, p : p + g.height, p : p + g.width])


def winograd_flops(g: ConvGeometry, training: bool = False, input_grad: bool = True) -> int:
    """Flops (2 per multiply-add) of the matrix products one call executes: the channel
    products and the tile transforms; with ``training`` the weight gradient and (``input_grad``)
    the input gradient too (:class:`Winograd`)."""
    th, tw = _tiles(g)
    t, c, o = g.batch * th * tw, g.in_channels, g.out_channels
    forward = 2 * (16 * t * c * o + 16 * 16 * t * c + 4 * 16 * t * o + 16 * 9 * c * o)
    if not training:
        return forward
    total = forward + 2 * (16 * t * c * o + 16 * 4 * t * o + 9 * 16 * c * o)
    if input_grad:
        total += 2 * (16 * t * o * c + 16 * 16 * t * c)
    return total


class Winograd(Algorithm):
    """Winograd F(2x2, 3x3): 3x3, stride-1, ungrouped convolutions with padding 0 to 2, in
    4/9 of the direct method's channel multiplications (see the module docstring)."""

    name = "winograd"
    scope = "3x3, stride-1, ungrouped (padding at most 2)"

    def supports(self, g: ConvGeometry) -> bool:
        return g.kernel_h == g.kernel_w == 3 and g.stride == 1 and g.groups == 1 and g.padding <= 2

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, WinogradSaved]:
        xp = backend.get_array_module(x_nhwc, w)
        V, (th, tw) = _input_transform(g, x_nhwc)
        y = _output_transform(xp.matmul(V, _kernel_transform(w)), g, th, tw)
        if b is not None:
            y += b
        return y, WinogradSaved(V if training else None, (th, tw))

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> WinogradSaved:
        V, tiles = _input_transform(g, x_nhwc)
        return WinogradSaved(V, tiles)

    def _weight_grad(self, g: ConvGeometry, dM: Any, saved: WinogradSaved, w: Any) -> Any:
        xp = backend.get_array_module(dM, w)
        if saved.V is None:
            raise ValueError("Winograd weight gradient needs the forward of a training call (training=True)")
        dU = xp.matmul(saved.V.transpose(0, 2, 1), dM)  # (16, C, O)
        c, o = g.in_channels, g.out_channels
        dw9 = xp.matmul(_matrices(xp, w.dtype)["GGT"], dU.reshape(16, c * o))  # (9, C O)
        return xp.ascontiguousarray(dw9.reshape(3, 3, c, o).transpose(3, 2, 0, 1))

    def _input_grad(self, g: ConvGeometry, dM: Any, tiles: tuple, w: Any) -> Any:
        xp = backend.get_array_module(dM, w)
        dV = xp.matmul(dM, _kernel_transform(w).transpose(0, 2, 1))  # (16, T, C)
        return _input_transform_adjoint(dV, g, *tiles)

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any) -> Any:
        return self._weight_grad(g, _output_tiles_adjoint(grad_y, g, *saved.tiles), saved, w)

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any) -> Any:
        tiles = _tiles(g)
        return self._input_grad(g, _output_tiles_adjoint(grad_y, g, *tiles), tiles, w)

    def backward(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """Both gradients from one transform of grad_y (dM)."""
        dM = _output_tiles_adjoint(grad_y, g, *saved.tiles)
        gx = self._input_grad(g, dM, saved.tiles, w) if need_input_grad else None
        return gx, self._weight_grad(g, dM, saved, w), bias_grad(grad_y)
