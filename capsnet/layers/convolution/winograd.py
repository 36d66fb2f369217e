"""Winograd F(2x2, 3x3) and F(4x4, 3x3) (Lavin and Gray, 2016) for 3x3, stride-1, ungrouped
convolutions.

The output is cut into m x m tiles (m = 2 or 4); each is computed from the (m + 2) x (m + 2)
input tile under it with (m + 2)^2 multiplications per (input, output) channel pair instead of
9 m^2: 16 instead of 36 for F(2x2, 3x3), 36 instead of 144 for F(4x4, 3x3):

    Y = A^T [(G w G^T) * (B^T d B)] A

for an input tile d, a 3x3 kernel w and the constant matrices below. The transforms are
linear maps of the a^2 tile entries (a = m + 2), so over a batch they are three matrix
products with a^2-long inner dimensions, and the channel sums are a^2 independent products,
one per tile entry (the "frequency" xi):

- input:  V[xi, t, c] = sum_k BB[xi, k] D[k, t, c]      D: the a x a tiles (a^2, T, C), stride m
- kernel: U[xi, c, o] = sum_k GG[xi, k] w[k, c, o]      w read as (9, C, O)
- output: M[xi] = V[xi] U[xi], (T, C) x (C, O);  Y[q, t, o] = sum_xi AA[q, xi] M[xi, t, o]

with BB = B^T (x) B^T, GG = G (x) G and AA = A^T (x) A^T, Kronecker products acting on
row-major flattened tiles.

Backward, with the same layout:

- weight gradient: dM[xi] = sum_q AA[q, xi] dY[q] (the adjoint of the output transform),
  dU[xi] = V[xi]^T dM[xi], (C, T) x (T, O), and dw = GG^T dU: V is what the forward keeps;
- input gradient: the adjoint of the forward from the same dM: dV[xi] = dM[xi] U[xi]^T,
  (T, O) x (O, C), dD = BB^T dV, and each tile's gradient added back where the tile was read
  (a^2 strided slice additions; neighbouring tiles overlap by two rows or columns).

Float32 rounding: F(2x2, 3x3)'s transforms have entries 0, +-1/2 and +-1 and stay within
about 1e-6 of the direct method (relative to the output's largest value); F(4x4, 3x3)'s reach
+-8 and 1/24 and stay within about 1e-5. Both are exact in exact arithmetic:
the tests compare them with a loop convolution in float64 to 1e-10.
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

from capsnet import backend
from capsnet.layers.convolution.algorithm import Algorithm, WeightCache
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["Winograd", "Winograd4", "WinogradSaved", "winograd_flops"]

# (B^T, G, A^T) of F(m, 3) for m = 2 (points 0, +-1) and m = 4 (points 0, +-1, +-2)
_TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
_HOST = {m: {name: np.kron(np.array(t, dtype=np.float64), np.array(t, dtype=np.float64))
             for name, t in zip(("BB", "GG", "AA"), ts)} for m, ts in _TRANSFORMS.items()}
# The tile entry whose column of AA is all ones (the point 1 in both directions): a bias added
# to M at that entry reaches every output of the tile once, so the forward adds it to a 1/a^2
# slice of M instead of the whole output, and the bias gradient is that entry of dM summed
_BIAS_ENTRY = {m: int(np.flatnonzero((t["AA"] == 1).all(axis=0))[0]) for m, t in _HOST.items()}

_matrices_lock = threading.Lock()
_DEVICE: dict[tuple, dict[str, Any]] = {}


def _matrices(xp: Any, dtype: Any, m: int) -> dict[str, Any]:
    """F(m, 3)'s BB, GG, AA (and their transposes, contiguous) on the device of ``xp``, in ``dtype``."""
    key = (*backend.device_key(xp), np.dtype(dtype).name, m)
    found = _DEVICE.get(key)
    if found is None:
        with _matrices_lock:
            found = _DEVICE.setdefault(key, {
                **{name: xp.asarray(t.astype(dtype)) for name, t in _HOST[m].items()},
                **{name + "T": xp.asarray(np.ascontiguousarray(t.T).astype(dtype)) for name, t in _HOST[m].items()}})
    return found


class WinogradSaved(NamedTuple):
    """What the weight gradient needs from the forward."""

    V: Any  # the transformed input tiles (a^2, T, C); None after an inference forward
    tiles: tuple  # (th, tw): output tiles per column and per row
    U: Any = None  # the transformed kernel (a^2, C, O) the forward used, for the input gradient


def _tiles(g: ConvGeometry, m: int) -> tuple[int, int]:
    return -(-g.out_h // m), -(-g.out_w // m)


def _input_transform(g: ConvGeometry, x_nhwc: Any, m: int) -> tuple[Any, tuple[int, int]]:
    """(V (a^2, T, C), (th, tw)): the a x a input tiles under each m x m output tile, T = B th tw
    ordered (b, ty, tx), gathered from the zero-padded input (one copy) and transformed by BB."""
    xp = backend.get_array_module(x_nhwc)
    a = m + 2
    th, tw = _tiles(g, m)
    b, h, w, c = x_nhwc.shape
    p = g.padding
    hn, wn = m * th + 2, m * tw + 2  # the padded extent the tiles cover: more rows/columns when m does not divide
    x_pad = xp.pad(x_nhwc, ((0, 0), (p, hn - h - p), (p, wn - w - p), (0, 0)))
    sb, sh, sw, sc = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(x_pad, shape=(a, a, b, th, tw, c),
                                           strides=(sh, sw, sb, m * sh, m * sw, sc))
    d = xp.ascontiguousarray(view).reshape(a * a, -1)
    V = xp.matmul(_matrices(xp, x_nhwc.dtype, m)["BB"], d)
    return V.reshape(a * a, b * th * tw, c), (th, tw)


def _kernel_transform(w: Any, m: int) -> Any:
    """U (a^2, C, O) from w (O, C, 3, 3)."""
    xp = backend.get_array_module(w)
    o, c = w.shape[:2]
    w9 = xp.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9, c * o)
    return xp.matmul(_matrices(xp, w.dtype, m)["GG"], w9).reshape((m + 2) ** 2, c, o)


def _output_transform(M: Any, g: ConvGeometry, th: int, tw: int, m: int) -> Any:
    """y (B, OH, OW, O), contiguous, from the tile products M (a^2, T, O)."""
    xp = backend.get_array_module(M)
    o = M.shape[2]
    q = xp.matmul(_matrices(xp, M.dtype, m)["AA"], M.reshape(M.shape[0], -1))  # (m^2, T O)
    tiles = q.reshape(m, m, g.batch, th, tw, o).transpose(2, 3, 0, 4, 1, 5)  # (B, th, m, tw, m, O), a view
    y = xp.empty((g.batch, g.out_h, g.out_w, o), dtype=M.dtype)
    if (g.out_h, g.out_w) == (m * th, m * tw):  # whole tiles: one copy into place
        y.reshape(g.batch, th, m, tw, m, o)[...] = tiles
    else:  # the last tiles overhang: gathered whole, then cropped
        y[...] = tiles.reshape(g.batch, m * th, m * tw, o)[:, : g.out_h, : g.out_w]
    return y


def _output_tiles_adjoint(grad_y: Any, g: ConvGeometry, th: int, tw: int, m: int) -> Any:
    """dM (a^2, T, O): the adjoint of :func:`_output_transform` applied to grad_y (B, OH, OW, O)."""
    xp = backend.get_array_module(grad_y)
    b, oh, ow, o = grad_y.shape
    if (oh, ow) != (m * th, m * tw):
        padded = xp.zeros((b, m * th, m * tw, o), dtype=grad_y.dtype)
        padded[:, :oh, :ow] = grad_y
        grad_y = padded
    tiles = xp.ascontiguousarray(grad_y.reshape(b, th, m, tw, m, o).transpose(2, 4, 0, 1, 3, 5)).reshape(m * m, -1)
    return xp.matmul(_matrices(xp, grad_y.dtype, m)["AAT"], tiles).reshape((m + 2) ** 2, b * th * tw, o)


def _input_transform_adjoint(dV: Any, g: ConvGeometry, th: int, tw: int, m: int) -> Any:
    """The input gradient (B, H, W, C), contiguous, from dV (a^2, T, C): the adjoint of
    :func:`_input_transform` (BB^T, then each tile's a^2 entries added where they were read)."""
    xp = backend.get_array_module(dV)
    a, c, p = m + 2, dV.shape[2], g.padding
    dD = xp.matmul(_matrices(xp, dV.dtype, m)["BBT"], dV.reshape(a * a, -1)).reshape(a, a, g.batch, th, tw, c)
    grad_pad = xp.zeros((g.batch, m * th + 2, m * tw + 2, c), dtype=dV.dtype)
    for r in range(a):  # a loop over the a^2 tile entries
        for s in range(a):
            grad_pad[:, r : r + m * th : m, s : s + m * tw : m] += dD[r, s]
    return xp.ascontiguousarray(grad_pad[:, p : p + g.height, p : p + g.width])


def winograd_flops(g: ConvGeometry, training: bool = False, input_grad: bool = True, m: int = 2) -> int:
    """Flops (2 per multiply-add) of the matrix products one call of F(m x m, 3x3) executes:
    the channel products and the tile transforms; with ``training`` the weight gradient and
    (``input_grad``) the input gradient too (:class:`Winograd`, :class:`Winograd4`)."""
    th, tw = _tiles(g, m)
    e = (m + 2) ** 2  # tile entries
    t, c, o = g.batch * th * tw, g.in_channels, g.out_channels
    forward = 2 * (e * t * c * o + e * e * t * c + m * m * e * t * o + e * 9 * c * o)
    if not training:
        return forward
    total = forward + 2 * (e * t * c * o + e * m * m * t * o + 9 * e * c * o)
    if input_grad:
        total += 2 * (e * t * o * c + e * e * t * c)
    return total


class Winograd(Algorithm):
    """Winograd F(2x2, 3x3): 3x3, stride-1, ungrouped convolutions with padding 0 to 2, in
    4/9 of the direct method's channel multiplications (see the module docstring)."""

    name = "winograd"
    scope = "3x3, stride-1, ungrouped (padding at most 2)"
    m = 2  # output tile size

    def __init__(self) -> None:
        self._kernel = WeightCache()  # inference: U, reused while the weights keep their values

    def release(self) -> None:
        self._kernel.clear()

    @property
    def nbytes(self) -> int:
        return self._kernel.nbytes

    def supports(self, g: ConvGeometry) -> bool:
        return g.kernel_h == g.kernel_w == 3 and g.stride == 1 and g.groups == 1 and g.padding <= 2

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, WinogradSaved]:
        xp = backend.get_array_module(x_nhwc, w)
        V, (th, tw) = _input_transform(g, x_nhwc, self.m)
        if training:
            self._kernel.clear()  # the weights are about to change: nothing to reuse
            U = _kernel_transform(w, self.m)
        else:
            U = self._kernel.get(w, (), lambda: _kernel_transform(w, self.m))
        M = xp.matmul(V, U)
        if b is not None:
            M[_BIAS_ENTRY[self.m]] += b
        y = _output_transform(M, g, th, tw, self.m)
        return y, (WinogradSaved(V, (th, tw), U) if training else WinogradSaved(None, (th, tw)))

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> WinogradSaved:
        V, tiles = _input_transform(g, x_nhwc, self.m)
        return WinogradSaved(V, tiles, _kernel_transform(w, self.m))

    def _weight_grad(self, g: ConvGeometry, dM: Any, saved: WinogradSaved, w: Any) -> Any:
        xp = backend.get_array_module(dM, w)
        if saved.V is None:
            raise ValueError("Winograd weight gradient needs the forward of a training call (training=True)")
        dU = xp.matmul(saved.V.transpose(0, 2, 1), dM)  # (a^2, C, O)
        c, o = g.in_channels, g.out_channels
        dw9 = xp.matmul(_matrices(xp, w.dtype, self.m)["GGT"], dU.reshape(dU.shape[0], c * o))  # (9, C O)
        return xp.ascontiguousarray(dw9.reshape(3, 3, c, o).transpose(3, 2, 0, 1))

    def _input_grad(self, g: ConvGeometry, dM: Any, tiles: tuple, w: Any, U: Any = None) -> Any:
        xp = backend.get_array_module(dM, w)
        if U is None:
            U = _kernel_transform(w, self.m)
        dV = xp.matmul(dM, U.transpose(0, 2, 1))  # (a^2, T, C)
        return _input_transform_adjoint(dV, g, *tiles, self.m)

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any) -> Any:
        return self._weight_grad(g, _output_tiles_adjoint(grad_y, g, *saved.tiles, self.m), saved, w)

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved | None, w: Any) -> Any:
        tiles = _tiles(g, self.m)
        U = getattr(saved, "U", None)
        return self._input_grad(g, _output_tiles_adjoint(grad_y, g, *tiles, self.m), tiles, w, U)

    def backward(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """Both gradients from one transform of grad_y (dM)."""
        dM = _output_tiles_adjoint(grad_y, g, *saved.tiles, self.m)
        gx = self._input_grad(g, dM, saved.tiles, w, saved.U) if need_input_grad else None
        return gx, self._weight_grad(g, dM, saved, w), dM[_BIAS_ENTRY[self.m]].sum(axis=0)


class Winograd4(Winograd):
    """Winograd F(4x4, 3x3): the same convolutions in 1/4 of the direct method's channel
    multiplications (36 per 4x4 output tile), with larger transforms and about ten times
    F(2x2, 3x3)'s float32 rounding (see the module docstring)."""

    name = "winograd4"
    m = 4
