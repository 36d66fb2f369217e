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
row-major flattened tiles. The tile transforms apply them as two passes of the one-dimensional
factor (B^T over the tile's rows, then over its columns: :func:`_kron_apply`), each a product
with an a-long inner dimension: 2 x 6 x 36 multiplications per F(4x4, 3x3) tile entry instead
of 36 x 36. They read and write memory twice, but a product this shallow is bound by memory
either way, and the dense Kronecker product had the larger share of the layer's time.

Backward, with the same layout:

- weight gradient: dM[xi] = sum_q AA[q, xi] dY[q] (the adjoint of the output transform),
  dU[xi] = V[xi]^T dM[xi], (C, T) x (T, O), and dw = GG^T dU: V is what the forward keeps;
- input gradient: the adjoint of the forward from the same dM: dV[xi] = dM[xi] U[xi]^T,
  (T, O) x (O, C), dD = BB^T dV, and each tile's gradient added back where the tile was read
  (neighbouring tiles overlap by two rows or columns: two additions fold the overlap into the
  next tile, then four copies place the tiles, :func:`_input_transform_adjoint`).

On NumPy all of this runs a block of images at a time (:data:`BLOCK_BYTES`, sized to the
cache): the gather, the transforms and the products of a block stay in the cache, where the
whole batch's tiles went out to memory and back at every pass. The transformed input V is
written into the whole batch's array in training, for the weight gradient; the weight
gradient's channel products are summed block by block.

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
from capsnet.layers.convolution.algorithm import Algorithm, WeightCache, cache_bytes, sum_rows
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["BLOCK_BYTES", "Winograd", "Winograd4", "WinogradSaved", "winograd_blocks", "winograd_flops"]

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
# What the products use, per m: the kernel transform GG = G (x) G (one product over the 9 taps),
# and the one-dimensional factors the tile transforms apply twice (:func:`_kron_apply`),
# Bt = B^T (a x a) and At = A^T (m x a); :func:`_matrices` adds their transposes for the adjoints
_HOST = {m: {"GG": np.kron(np.array(g, dtype=np.float64), np.array(g, dtype=np.float64)),
             "Bt": np.array(bt, dtype=np.float64), "At": np.array(at, dtype=np.float64)}
         for m, (bt, g, at) in _TRANSFORMS.items()}
# The tile entry whose column of AA = At (x) At is all ones: (j, j) for the column j of At that is
# all ones (the point 1). A bias added to M at that entry reaches every output of the tile once,
# so the forward adds it to a 1/a^2 slice of M instead of the whole output, and the bias gradient
# is that entry of dM summed
_ONES = {m: int(np.flatnonzero((t["At"] == 1).all(axis=0))[0]) for m, t in _HOST.items()}
_BIAS_ENTRY = {m: j * (m + 2) + j for m, j in _ONES.items()}

_matrices_lock = threading.Lock()
_DEVICE: dict[tuple, dict[str, Any]] = {}


def _matrices(xp: Any, dtype: Any, m: int) -> dict[str, Any]:
    """F(m, 3)'s GG, Bt and At (and their transposes, contiguous, as GGT, BtT, AtT) on the device
    of ``xp``, in ``dtype``."""
    key = (*backend.device_key(xp), np.dtype(dtype).name, m)
    found = _DEVICE.get(key)
    if found is None:
        with _matrices_lock:
            found = _DEVICE.setdefault(key, {
                **{name: xp.asarray(t.astype(dtype)) for name, t in _HOST[m].items()},
                **{name + "T": xp.asarray(np.ascontiguousarray(t.T).astype(dtype)) for name, t in _HOST[m].items()}})
    return found


def _kron_apply(xp: Any, t: Any, x: Any) -> Any:
    """(t (x) t) x for t (p, k) and x (k^2, N) (rows: row-major k x k tiles): t over the
    tiles' rows, then over their columns, two products with a k-long inner dimension
    instead of one with k^2. Returns (p^2, N)."""
    p, k = t.shape
    rows = xp.matmul(t, x.reshape(k, -1))  # (p, k N): [i, s, n] = sum_r t[i, r] x[r, s, n]
    return xp.matmul(t, rows.reshape(p, k, -1)).reshape(p * p, -1)  # [i, j, n] = sum_s t[j, s] rows[i, s, n]


class WinogradSaved(NamedTuple):
    """What the weight gradient needs from the forward."""

    V: Any  # the transformed input tiles (a^2, T, C); None after an inference forward
    tiles: tuple  # (th, tw): output tiles per column and per row
    U: Any = None  # the transformed kernel (a^2, C, O) the forward used, for the input gradient


def _tiles(g: ConvGeometry, m: int) -> tuple[int, int]:
    return -(-g.out_h // m), -(-g.out_w // m)


def _cache_bytes() -> int:
    """The working set of one block of images: 3/4 of a core's L2 cache as the OS reports it
    (:func:`~.algorithm.cache_bytes`; 1 MiB on the project's AMD EPYC), 768 KiB where it says
    nothing."""
    l2 = cache_bytes(2)
    return 3 * l2 // 4 if l2 else 768 << 10


BLOCK_BYTES = _cache_bytes()
"""On NumPy, a Winograd convolution runs a block of images at a time from the gather to the
output, so that the transformed tiles, their products and the transforms between stay in the
cache: the largest of them (a^2 x tiles x channels values) at most this many bytes, one image
at least. Each pass of these transforms is bound by memory. Measured on the project's 2-core
AMD EPYC (1 MiB L2, one thread, ``scripts/bench_winograd_blocks.py``, batch 16 to 100) on
Efficient-CapsNet's two 3x3 layers and a CIFAR-style 3x3: this size took at most 1.11x the time
of the fastest size tried (256 KiB to 4 MiB), and the whole batch as one block 1.5x to 2.1x its
time in inference, 1.1x to 1.8x in training. Rerun that script on another CPU. On CuPy the
whole batch is one block."""


def _blocks(g: ConvGeometry, m: int, width: int, xp: Any) -> list[tuple[int, int]]:
    """The (first, last + 1) images of each block (see :data:`BLOCK_BYTES`); ``width``: the
    widest channel count of the tiles (in or out)."""
    if xp is not np:
        return [(0, g.batch)]
    th, tw = _tiles(g, m)
    per_image = (m + 2) ** 2 * th * tw * width * np.dtype(g.dtype).itemsize
    n = max(1, BLOCK_BYTES // per_image)
    return [(lo, min(lo + n, g.batch)) for lo in range(0, g.batch, n)]


def winograd_blocks(g: ConvGeometry, m: int) -> int:
    """How many blocks of images a call of F(m x m, 3x3) on ``g`` runs in (1 off NumPy)."""
    return len(_blocks(g, m, max(g.in_channels, g.out_channels), np if g.backend == "numpy" else None))


def _padded(g: ConvGeometry, x_nhwc: Any, m: int) -> Any:
    """x zero-padded to the (m th + 2) x (m tw + 2) extent the tiles read (x itself when that is its size)."""
    xp = backend.get_array_module(x_nhwc)
    th, tw = _tiles(g, m)
    p = g.padding
    bottom, right = m * th + 2 - g.height - p, m * tw + 2 - g.width - p  # at least p: more where m does not divide
    if p == bottom == right == 0:
        return x_nhwc
    return xp.pad(x_nhwc, ((0, 0), (p, bottom), (p, right), (0, 0)))


def _input_transform(g: ConvGeometry, x_pad: Any, m: int, lo: int = 0, hi: int | None = None) -> Any:
    """V (a^2, T, C) of images lo..hi of the padded input: the a x a tiles under each m x m output
    tile, T = (hi - lo) th tw ordered (b, ty, tx), gathered (one copy) and transformed by B^T on
    both sides."""
    xp = backend.get_array_module(x_pad)
    a = m + 2
    th, tw = _tiles(g, m)
    part = x_pad[lo:hi]
    b, c = part.shape[0], part.shape[3]
    sb, sh, sw, sc = part.strides
    view = xp.lib.stride_tricks.as_strided(part, shape=(a, a, b, th, tw, c),
                                           strides=(sh, sw, sb, m * sh, m * sw, sc))
    d = xp.ascontiguousarray(view).reshape(a * a, -1)
    V = _kron_apply(xp, _matrices(xp, x_pad.dtype, m)["Bt"], d)
    return V.reshape(a * a, b * th * tw, c)


def _kernel_transform(w: Any, m: int) -> Any:
    """U (a^2, C, O) from w (O, C, 3, 3)."""
    xp = backend.get_array_module(w)
    o, c = w.shape[:2]
    w9 = xp.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9, c * o)
    return xp.matmul(_matrices(xp, w.dtype, m)["GG"], w9).reshape((m + 2) ** 2, c, o)


def _output_transform(M: Any, y: Any, th: int, tw: int, m: int) -> None:
    """Writes y (b, OH, OW, O), a block of the output, from its tile products M (a^2, b th tw, O):
    A^T on both sides, then each tile into place (cropped where the last tiles overhang)."""
    xp = backend.get_array_module(M)
    b, oh, ow, o = y.shape
    q = _kron_apply(xp, _matrices(xp, M.dtype, m)["At"], M.reshape(M.shape[0], -1))  # (m^2, T O)
    tiles = q.reshape(m, m, b, th, tw, o).transpose(2, 3, 0, 4, 1, 5)  # (b, th, m, tw, m, O), a view
    if (oh, ow) == (m * th, m * tw):  # whole tiles: one copy into place
        y.reshape(b, th, m, tw, m, o)[...] = tiles
    else:  # the last tiles overhang: in place whole in a scratch block, then cropped
        whole = xp.empty((b, th, m, tw, m, o), dtype=M.dtype)
        whole[...] = tiles
        y[...] = whole.reshape(b, m * th, m * tw, o)[:, :oh, :ow]


def _output_tiles_adjoint(grad_y: Any, th: int, tw: int, m: int) -> Any:
    """dM (a^2, T, O): the adjoint of :func:`_output_transform` applied to grad_y (b, OH, OW, O)."""
    xp = backend.get_array_module(grad_y)
    b, oh, ow, o = grad_y.shape
    if (oh, ow) != (m * th, m * tw):  # the last tiles overhang the output: zeros there
        padded = xp.zeros((b, m * th, m * tw, o), dtype=grad_y.dtype)
        padded[:, :oh, :ow] = grad_y
        grad_y = padded
    tiles = xp.ascontiguousarray(grad_y.reshape(b, th, m, tw, m, o).transpose(2, 4, 0, 1, 3, 5)).reshape(m * m, -1)
    return _kron_apply(xp, _matrices(xp, grad_y.dtype, m)["AtT"], tiles).reshape((m + 2) ** 2, b * th * tw, o)


def _input_transform_adjoint(dV: Any, g: ConvGeometry, gx: Any, th: int, tw: int, m: int) -> None:
    """Writes gx (b, H, W, C), a block of the input gradient, from its dV (a^2, b th tw, C): the
    adjoint of :func:`_input_transform`, B on both sides, then each tile's a^2 entries added
    where they were read. Neighbouring tiles overlap by e = 2 rows and columns: the entries
    past m (r >= m) are first added to entry r - m of the next tile, column-wise then row-wise
    (two additions), after which the padded gradient is four copies: the m x m cores of the
    tiles, the last column's and last row's overhang, and the corner."""
    xp = backend.get_array_module(dV)
    a, e, c, p = m + 2, 2, dV.shape[2], g.padding
    b = gx.shape[0]
    dD = _kron_apply(xp, _matrices(xp, dV.dtype, m)["BtT"], dV.reshape(a * a, -1)).reshape(a, a, b, th, tw, c)
    if tw > 1:
        dD[:, :e, :, :, 1:] += dD[:, m:, :, :, :-1]
    if th > 1:
        dD[:e, :, :, 1:] += dD[m:, :, :, :-1]
    grad_pad = xp.empty((b, m * th + e, m * tw + e, c), dtype=dV.dtype)
    grad_pad[:, : m * th, : m * tw].reshape(b, th, m, tw, m, c)[...] = dD[:m, :m].transpose(2, 3, 0, 4, 1, 5)
    grad_pad[:, : m * th, m * tw :].reshape(b, th, m, e, c)[...] = dD[:m, m:, :, :, -1].transpose(2, 3, 0, 1, 4)
    grad_pad[:, m * th :, : m * tw].reshape(b, e, tw, m, c)[...] = dD[m:, :m, :, -1].transpose(2, 0, 3, 1, 4)
    grad_pad[:, m * th :, m * tw :] = dD[m:, m:, :, -1, -1].transpose(2, 0, 1, 3)
    gx[...] = grad_pad[:, p : p + g.height, p : p + g.width]


def winograd_flops(g: ConvGeometry, training: bool = False, input_grad: bool = True, m: int = 2) -> int:
    """Flops (2 per multiply-add) of the matrix products one call of F(m x m, 3x3) executes:
    the channel products and the tile transforms (each applied as two passes of its
    one-dimensional factor, :func:`_kron_apply`); with ``training`` the weight gradient and
    (``input_grad``) the input gradient too (:class:`Winograd`, :class:`Winograd4`)."""
    th, tw = _tiles(g, m)
    a = m + 2
    e = a * a  # tile entries
    t, c, o = g.batch * th * tw, g.in_channels, g.out_channels
    tile_in = 2 * a ** 3  # B^T on both sides of an a x a tile, per channel
    tile_out = m * a * a + m * m * a  # A^T on both sides, down to m x m
    forward = 2 * (e * t * c * o + tile_in * t * c + tile_out * t * o + e * 9 * c * o)
    if not training:
        return forward
    total = forward + 2 * (e * t * c * o + tile_out * t * o + 9 * e * c * o)
    if input_grad:
        total += 2 * (e * t * o * c + tile_in * t * c)
    return total


class Winograd(Algorithm):
    """Winograd F(2x2, 3x3): 3x3, stride-1, ungrouped convolutions with padding 0 to 2, in
    4/9 of the direct method's channel multiplications (see the module docstring). On NumPy
    each call runs in blocks of images (:data:`BLOCK_BYTES`)."""

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
        m, th, tw = self.m, *_tiles(g, self.m)
        if training:
            self._kernel.clear()  # the weights are about to change: nothing to reuse
            U = _kernel_transform(w, m)
        else:
            U = self._kernel.get(w, (), lambda: _kernel_transform(w, m))
        x_pad = _padded(g, x_nhwc, m)
        y = xp.empty((g.batch, g.out_h, g.out_w, g.out_channels), dtype=x_nhwc.dtype)
        blocks = _blocks(g, m, max(g.in_channels, g.out_channels), xp)
        keep = None
        if training and len(blocks) > 1:
            keep = xp.empty(((m + 2) ** 2, g.batch * th * tw, g.in_channels), dtype=x_nhwc.dtype)
        for lo, hi in blocks:
            V = _input_transform(g, x_pad, m, lo, hi)
            if keep is not None:
                keep[:, lo * th * tw : hi * th * tw] = V
            elif training:
                keep = V  # one block: V is the whole batch's
            M = xp.matmul(V, U)
            if b is not None:
                M[_BIAS_ENTRY[m]] += b
            _output_transform(M, y[lo:hi], th, tw, m)
        return y, (WinogradSaved(keep, (th, tw), U) if training else WinogradSaved(None, (th, tw)))

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> WinogradSaved:
        V = _input_transform(g, _padded(g, x_nhwc, self.m), self.m)
        return WinogradSaved(V, _tiles(g, self.m), _kernel_transform(w, self.m))

    def _gradients(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved | None, w: Any, need_input: bool,
                   need_weight: bool) -> tuple[Any | None, Any | None, Any]:
        """(grad_x, grad_w, grad_b), block by block from dM, the adjoint of the output
        transform; the weight gradient's channel products are summed over the blocks."""
        xp = backend.get_array_module(grad_y, w)
        m, th, tw = self.m, *_tiles(g, self.m)
        if need_weight and (saved is None or saved.V is None):
            raise ValueError("Winograd weight gradient needs the forward of a training call (training=True)")
        U = getattr(saved, "U", None)
        if need_input and U is None:
            U = _kernel_transform(w, m)
        gx = xp.empty((g.batch, g.height, g.width, g.in_channels), dtype=grad_y.dtype) if need_input else None
        dU = db = None
        for lo, hi in _blocks(g, m, max(g.in_channels, g.out_channels), xp):
            dM = _output_tiles_adjoint(grad_y[lo:hi], th, tw, m)
            part = sum_rows(dM[_BIAS_ENTRY[m]])
            db = part if db is None else db + part
            if need_weight:
                part = xp.matmul(saved.V[:, lo * th * tw : hi * th * tw].transpose(0, 2, 1), dM)  # (a^2, C, O)
                dU = part if dU is None else dU + part
            if need_input:
                _input_transform_adjoint(xp.matmul(dM, U.transpose(0, 2, 1)), g, gx[lo:hi], th, tw, m)
        dw = None
        if need_weight:
            c, o = g.in_channels, g.out_channels
            dw9 = xp.matmul(_matrices(xp, w.dtype, m)["GGT"], dU.reshape(dU.shape[0], c * o))  # (9, C O)
            dw = xp.ascontiguousarray(dw9.reshape(3, 3, c, o).transpose(3, 2, 0, 1))
        return gx, dw, db

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any) -> Any:
        return self._gradients(g, grad_y, saved, w, need_input=False, need_weight=True)[1]

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved | None, w: Any) -> Any:
        return self._gradients(g, grad_y, saved, w, need_input=True, need_weight=False)[0]

    def backward(self, g: ConvGeometry, grad_y: Any, saved: WinogradSaved, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """Both gradients from one transform of grad_y (dM) per block."""
        return self._gradients(g, grad_y, saved, w, need_input=need_input_grad, need_weight=True)


class Winograd4(Winograd):
    """Winograd F(4x4, 3x3): the same convolutions in 1/4 of the direct method's channel
    multiplications (36 per 4x4 output tile), with larger transforms and about ten times
    F(2x2, 3x3)'s float32 rounding (see the module docstring)."""

    name = "winograd4"
    m = 4
