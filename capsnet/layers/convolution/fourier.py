"""2-D convolution in the Fourier domain, with the transforms done as matrix products.

For a strided convolution with a large kernel on a small image (PrimaryCaps: 9x9,
stride 2, 20x20x256 in, 6x6x256 out) the direct method spends 2*81*C*O flops per
output pixel. Here the input is split into its ``stride**2`` polyphase components
(``x[s*y + p, s*x + q]``), each an ``Ny x Nx`` grid, which turns the strided
correlation into a sum of ``stride**2`` unit-stride correlations with
``ceil(k/stride)``-sized sub-kernels. On the ``Ny x Nx`` grid these correlations
are exact as circular ones (the valid outputs never wrap), so after a 2-D real
DFT each frequency is one small complex matrix product over (phase, channel):

    Y_f = X_f @ conj(W_f)        X_f: (B, s*s*C),  W_f: (s*s*C, O)

That is one product of depth ``s*s*C`` per frequency of the non-redundant half
spectrum (about ``Ny*Nx/2``) instead of ``Ho*Wo`` of depth ``k*k*C``: for
PrimaryCaps 52 complex products of depth 1024 (4 real multiply-adds each)
against 36 real ones of depth 20736, 0.35 of the flops with the transforms.

The grids are tiny (10x10), so the DFTs are dense matrix products against
precomputed cosine/sine tables instead of FFT calls, and complex numbers are
kept split as a (real, imaginary) axis: every product is a real GEMM and every
layout change moves whole channel vectors. The same holds for both gradients:

    dX_f = dY_f @ W_f^T                    (a convolution with the kernel)
    dW_f = X_f^T @ conj(dY_f)              (a correlation of input and gradient)

Arrays are channels-last: x (B, H, W, C), weight (O, C, KH, KW) as everywhere.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Any, NamedTuple

import numpy as np

from capsnet import backend
from capsnet.layers.base import conv_output_size
from capsnet.layers.convolution.algorithm import Algorithm, WeightCache, bias_grad
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = [
    "Fourier",
    "FourierConv",
    "FourierSaved",
    "Spectra",
    "SharedSpectrum",
    "SpectrumCache",
    "Workspace",
    "conv2d_fourier_nhwc",
    "conv2d_fourier_nhwc_backward",
    "fourier_flops",
    "fourier_geometry",
    "input_spectrum",
    "weight_spectrum",
]

def fourier_geometry(h: int, w: int, kh: int, kw: int, stride: int) -> dict:
    """Sizes of the polyphase Fourier formulation for an (already padded) h x w input."""
    oh, ow = conv_output_size(h, kh, stride, 0), conv_output_size(w, kw, stride, 0)
    uh, uw = -(-kh // stride), -(-kw // stride)  # sub-kernel extent
    ny, nx = oh + uh - 1, ow + uw - 1  # polyphase grid: the valid outputs never wrap
    return {"oh": oh, "ow": ow, "ny": ny, "nx": nx, "bins": len(_frequencies(ny, nx)[0])}


@functools.lru_cache(maxsize=32)
def _frequencies(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frequencies (fy, fx) kept for a real ny x nx grid, and what each stands for.

    The spectrum of a real grid is Hermitian: X(fy, fx) = conj X(-fy, -fx). Half of
    the columns, fx = 0 .. nx//2, hold it all; in the columns that are their own
    mirror (fx = 0, and fx = nx/2 for even nx) only fy = 0 .. ny//2 are needed.
    Returns (fy, fx, copies): copies is 2 where the frequency also stands for its
    mirror, 1 where it is its own mirror (and so real). For 10 x 10: 52 of 100.
    """
    fys, fxs, copies = [], [], []
    for fx in range(nx // 2 + 1):
        own_mirror = fx == 0 or 2 * fx == nx
        for fy in range(ny // 2 + 1 if own_mirror else ny):
            fys.append(fy)
            fxs.append(fx)
            copies.append(1 if own_mirror and (fy == 0 or 2 * fy == ny) else 2)
    return np.array(fys), np.array(fxs), np.array(copies, dtype=float)


def fourier_flops(h: int, w: int, c: int, o: int, kh: int, kw: int, stride: int,
                  backward: bool = False, input_grad: bool = True) -> tuple[int, int]:
    """(direct, Fourier) flops per image, 2 per real multiply-add, of the matrix products.

    Forward (default): direct convolution against the per-frequency products plus
    the DFTs of the input grid and back to the output. ``backward=True`` counts the
    gradients instead: direct, the weight gradient and (``input_grad``) the input
    gradient; Fourier, the DFT of the output gradient, the weight-gradient
    products and (``input_grad``) the input-gradient products and their inverse
    DFT. The transforms of the weights, once per call whatever the batch, are
    not per-image work and are left out.
    """
    g = fourier_geometry(h, w, kh, kw, stride)
    direct = 2 * g["oh"] * g["ow"] * kh * kw * c * o
    k = stride * stride * c
    spectral = 8 * g["bins"] * k * o
    grid_dft = 2 * (2 * g["bins"]) * g["ny"] * g["nx"] * k  # input grid <-> spectrum
    out_dft = 2 * (2 * g["bins"]) * g["oh"] * g["ow"] * o  # output <-> spectrum
    if not backward:
        return direct, spectral + grid_dft + out_dft
    if input_grad:
        return 2 * direct, out_dft + 2 * spectral + grid_dft
    return direct, out_dft + spectral


@functools.lru_cache(maxsize=32)
def _tables(ny: int, nx: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Forward and inverse real 2-D DFT on an ny x nx grid, over the kept frequencies.

    fwd: (2F, ny*nx), rows (frequency, re/im):  X_f = sum_t x_t exp(-i theta_ft)
    inv: (ny*nx, 2F):  x_t = Re sum_f copies_f X_f exp(+i theta_ft) / (ny*nx)
    (see :func:`_frequencies`). Built in float64 and rounded once.
    """
    fy, fx, copies = _frequencies(ny, nx)
    ty, tx = np.divmod(np.arange(ny * nx), nx)
    # reduce the phase products mod n first so the angles stay exact multiples of 2 pi / n
    theta = 2 * np.pi * ((np.outer(fy, ty) % ny) / ny + (np.outer(fx, tx) % nx) / nx)  # (F, T)
    cos, sin = np.cos(theta), np.sin(theta)
    sin[copies == 1] = 0.0  # frequencies that are their own mirror are real
    fwd = np.stack([cos, -sin], axis=1).reshape(-1, ny * nx)
    scale = (copies / (ny * nx))[:, None]
    inv = np.stack([cos * scale, -sin * scale], axis=1).reshape(-1, ny * nx).T
    return np.ascontiguousarray(fwd.astype(dtype)), np.ascontiguousarray(inv.astype(dtype))


def _grid_index(ny: int, nx: int, h: int, w: int) -> np.ndarray:
    """Flat indices of the top-left h x w block of an ny x nx grid."""
    return (np.arange(h)[:, None] * nx + np.arange(w)[None, :]).ravel()


class _Plan:
    """DFT tables for one geometry, dtype and backend, sliced to the grids in use."""

    def __init__(self, xp: Any, dtype: Any, kh: int, kw: int, stride: int, g: dict):
        fwd, inv = _tables(g["ny"], g["nx"], np.dtype(dtype).name)
        ny, nx = g["ny"], g["nx"]
        self.uh, self.uw = -(-kh // stride), -(-kw // stride)
        out_idx = _grid_index(ny, nx, g["oh"], g["ow"])
        tap_idx = _grid_index(ny, nx, self.uh, self.uw)
        host = {
            "fwd": fwd,  # (2F, Ny*Nx): input grid -> spectrum
            "inv": inv,  # (Ny*Nx, 2F): spectrum -> grid
            "fwd_out": fwd[:, out_idx],  # (2F, OH*OW): output gradient -> spectrum
            "inv_out": inv[out_idx],  # (OH*OW, 2F): spectrum -> output
            "fwd_taps": fwd[:, tap_idx],  # (2F, UH*UW): sub-kernel -> spectrum
            "inv_taps": inv[tap_idx],  # (UH*UW, 2F): spectrum -> sub-kernel
        }
        for name, table in host.items():
            setattr(self, name, xp.asarray(np.ascontiguousarray(table)))


_PLANS: dict = {}


def _plan(xp: Any, dtype: Any, kh: int, kw: int, stride: int, g: dict) -> _Plan:
    key = (*backend.device_key(xp), np.dtype(dtype).name, kh, kw, stride, g["ny"], g["nx"], g["oh"], g["ow"])
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 64:  # inputs of ever-changing sizes: start over rather than grow
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(xp, dtype, kh, kw, stride, g)
    return plan


def _scratch(work: Any, xp: Any, name: str, shape: tuple, dtype: Any) -> Any:
    """An uninitialised array: from the workspace when there is one."""
    return xp.empty(shape, dtype=dtype) if work is None else work.get(xp, name, shape, dtype)


def _fit(x: Any, rows: int, cols: int) -> Any:
    """Crop or zero-extend x (B, H, W, C) to (B, rows, cols, C)."""
    xp = backend.get_array_module(x)
    b, h, w, c = x.shape
    if h >= rows and w >= cols:
        return x[:, :rows, :cols]
    out = xp.zeros((b, rows, cols, c), dtype=x.dtype)
    out[:, : min(h, rows), : min(w, cols)] = x[:, :rows, :cols]
    return out


def weight_spectrum(w: Any, stride: int, plan: _Plan, g: dict, work: Any = None, keep: Any = None) -> Any:
    """W_f split into (F, 2, s*s*C, O), from w (O, C, KH, KW); rows ordered (phase p, q, c).

    The polyphase sub-kernels' taps (UH, UW, C*O), zero where the kernel ends, go through the
    DFT into their phase's rows of the spectrum. On NumPy one phase at a time, so the scratch
    is one sub-kernel (6.5 MB for PrimaryCaps, where a zero-extended copy of the whole kernel
    and its taps took 52 MB); on a GPU all phases in one product, for fewer launches.
    Scratch comes from workspace ``work``, the result from workspace ``keep`` (when given)."""
    xp = backend.get_array_module(w)
    o, c, kh, kw = w.shape
    s, uh, uw = stride, plan.uh, plan.uw
    spec = _scratch(keep, xp, "weight_spectrum", (2 * g["bins"], s * s, c * o), w.dtype)
    n = 1 if xp is np else s * s  # phases per product
    taps = _scratch(work, xp, "taps", (n, uh, uw, c, o), w.dtype)
    if n > 1:
        taps[...] = 0
    for first in range(0, s * s, n):
        for k in range(n):
            p, q = divmod(first + k, s)
            th, tw = len(range(p, kh, s)), len(range(q, kw, s))  # this phase's taps of the kernel
            if n == 1:  # only the margins the kernel leaves are zeroed
                taps[k, th:] = 0
                taps[k, :th, tw:] = 0
            taps[k, :th, :tw] = w[:, :, p::s, q::s].transpose(2, 3, 1, 0)
        xp.matmul(plan.fwd_taps, taps.reshape(n, uh * uw, c * o), out=spec[:, first : first + n].transpose(1, 0, 2))
    return spec.reshape(g["bins"], 2, s * s * c, o)


class Workspace:
    """Named scratch arrays kept from one call to the next.

    A fresh 100 MB array costs its page faults (about 10 ms per 126 MB on the
    2-core test machine) every time; an array kept here is reused by the next
    call that asks for the same name, if it is large enough and on the same
    device. Whatever a call takes from a workspace is overwritten by the next
    call, so only scratch that does not outlive the call may come from one.
    :meth:`clear` frees it all.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, Any] = {}

    def get(self, xp: Any, name: str, shape: tuple, dtype: Any) -> Any:
        """An uninitialised array of ``shape`` and ``dtype`` on backend ``xp`` (its current device)."""
        n = math.prod(shape)
        buf = self._arrays.get(name)
        if (buf is None or buf.dtype != np.dtype(dtype) or buf.size < n
                or backend.device_key(buf) != backend.device_key(xp)):
            buf = self._arrays[name] = xp.empty(n, dtype=dtype)
        return buf[:n].reshape(shape)

    def clear(self) -> None:
        self._arrays.clear()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())


class SpectrumCache(WeightCache):
    """The weight spectrum of the last call, reused while the weights stay the same (a few ms
    to compare them against ~30 ms to transform PrimaryCaps' kernel; see :class:`WeightCache`)."""

    def get(self, w: Any, stride: int, plan: _Plan, g: dict, work: Any = None) -> Any:  # type: ignore[override]
        return super().get(w, (stride, g["ny"], g["nx"]), lambda: weight_spectrum(w, stride, plan, g, work))


def input_spectrum(x: Any, stride: int, plan: _Plan, g: dict, work: Any = None, keep: Any = None) -> Any:
    """X_f split into (F, 2, B, s*s*C), from x (B, H, W, C) (already padded); workspaces as
    in :func:`weight_spectrum`."""
    xp = backend.get_array_module(x)
    b, c = x.shape[0], x.shape[3]
    s, ny, nx = stride, g["ny"], g["nx"]
    x = _fit(x, s * ny, s * nx)
    # (y, x, b, p, q, c): every copied run is a whole (q, c) row of s*C values
    grid = _scratch(work, xp, "grid", (ny, nx, b, s, s, c), x.dtype)
    grid[...] = x.reshape(b, ny, s, nx, s, c).transpose(1, 3, 0, 2, 4, 5)
    spec = _scratch(keep, xp, "input_spectrum", (2 * g["bins"], b * s * s * c), x.dtype)
    xp.matmul(plan.fwd, grid.reshape(ny * nx, -1), out=spec)
    return spec.reshape(g["bins"], 2, b, s * s * c)


class Spectra(NamedTuple):
    """What the gradients of :func:`conv2d_fourier_nhwc` need."""

    input: Any  # X_f (F, 2, B, s*s*C)
    weight: Any  # W_f (F, 2, s*s*C, O)
    padded_shape: tuple  # (B, H, W, C) of the padded input
    grid: dict  # fourier_geometry
    plan: Any  # the DFT tables


def conv2d_fourier_nhwc(x_nhwc: Any, w: Any, b: Any | None, stride: int = 1, padding: int = 0,
                        work: Any = None, keep: Any = None, weight_cache: SpectrumCache | None = None
                        ) -> tuple[Any, Spectra]:
    """Channels-last convolution, the same map as ``conv2d_nhwc``, computed per frequency.

    x (B, H, W, C), w (O, C, KH, KW), b (O,) or None -> (y (B, OH, OW, O), cache),
    where the cache (:class:`Spectra`) is what :func:`conv2d_fourier_nhwc_backward` needs.
    Workspaces (:class:`~capsnet.layers.base.Workspace`), both optional: ``work``
    for the scratch that dies with the call, ``keep`` for the two spectra in the
    cache. The next call given the same ``keep`` overwrites that cache, so pass it
    again only once the backward of this call has run. ``weight_cache`` (a
    :class:`SpectrumCache`) supplies the weight spectrum when the weights are
    unchanged since its last use.
    """
    xp = backend.get_array_module(x_nhwc, w)
    o, c, kh, kw = w.shape
    if padding:
        x_nhwc = xp.pad(x_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    bsz, h, wd = x_nhwc.shape[:3]
    g = fourier_geometry(h, wd, kh, kw, stride)
    plan = _plan(xp, w.dtype, kh, kw, stride, g)
    f = g["bins"]
    xs = input_spectrum(x_nhwc, stride, plan, g, work, keep)  # (F, 2, B, K)
    if weight_cache is None:
        ws = weight_spectrum(w, stride, plan, g, work, keep)  # (F, 2, K, O)
    else:
        ws = weight_cache.get(w, stride, plan, g, work)
    # Y = X conj(W), with re and im of X stacked into one (2B, K) matrix per frequency
    x2 = xs.reshape(f, 2 * bsz, -1)
    pr = _scratch(work, xp, "product_re", (f, 2 * bsz, o), w.dtype)
    pi = _scratch(work, xp, "product_im", (f, 2 * bsz, o), w.dtype)
    xp.matmul(x2, ws[:, 0], out=pr)  # [Xr; Xi] Wr
    xp.matmul(x2, ws[:, 1], out=pi)  # [Xr; Xi] Wi
    ys = _scratch(work, xp, "output_spectrum", (f, 2, bsz, o), w.dtype)
    xp.add(pr[:, :bsz], pi[:, bsz:], out=ys[:, 0])  # Xr Wr + Xi Wi
    xp.subtract(pr[:, bsz:], pi[:, :bsz], out=ys[:, 1])  # Xi Wr - Xr Wi
    grid = _scratch(work, xp, "output_grid", (g["oh"] * g["ow"], bsz * o), w.dtype)
    xp.matmul(plan.inv_out, ys.reshape(2 * f, -1), out=grid)
    y = grid.reshape(g["oh"], g["ow"], bsz, o).transpose(2, 0, 1, 3).copy()  # never the scratch itself
    if b is not None:
        y += b
    return y, Spectra(xs, ws, (bsz, h, wd, c), g, plan)


def output_gradient_spectrum(grad_y: Any, cache: Spectra) -> Any:
    """dY_f (F, 2, B, O) of grad_y (B, OH, OW, O), shared by both gradients."""
    xp = backend.get_array_module(grad_y)
    g, bsz, o = cache.grid, grad_y.shape[0], grad_y.shape[3]
    gy = xp.ascontiguousarray(grad_y.transpose(1, 2, 0, 3)).reshape(g["oh"] * g["ow"], -1)
    return (cache.plan.fwd_out @ gy).reshape(g["bins"], 2, bsz, o)


def fourier_input_grad(gs: Any, cache: Spectra, stride: int, padding: int) -> Any:
    """grad_x (B, H, W, C) from dY_f (:func:`output_gradient_spectrum`): dX_f = dY_f W_f^T."""
    xp = backend.get_array_module(gs)
    ws, (bsz, h, wd, c), g, plan = cache.weight, cache.padded_shape, cache.grid, cache.plan
    s, ny, nx, f = stride, g["ny"], g["nx"], g["bins"]
    g2 = gs.reshape(f, 2 * bsz, -1)  # [dYr; dYi]
    # dX = dY W from [dYr; dYi] Wr^T and [dYr; dYi] Wi^T, a quarter of the
    # frequencies at a time so the two products stay a fraction of the spectrum's size
    gxs = xp.empty((f, 2, bsz, s * s * c), dtype=gs.dtype)
    step = -(-f // 4)
    for lo in range(0, f, step):
        band = slice(lo, min(f, lo + step))
        pr = g2[band] @ ws[band, 0].transpose(0, 2, 1)  # (n, 2B, K)
        pi = g2[band] @ ws[band, 1].transpose(0, 2, 1)
        xp.subtract(pr[:, :bsz], pi[:, bsz:], out=gxs[band, 0])  # dYr Wr - dYi Wi
        xp.add(pi[:, :bsz], pr[:, bsz:], out=gxs[band, 1])  # dYr Wi + dYi Wr
        del pr, pi
    grid = plan.inv @ gxs.reshape(2 * f, -1)
    del gxs
    gx = grid.reshape(ny, nx, bsz, s, s, c).transpose(2, 0, 3, 1, 4, 5).reshape(bsz, s * ny, s * nx, c)
    if s * ny != h or s * nx != wd:
        full = xp.zeros((bsz, h, wd, c), dtype=gx.dtype)
        full[:, : min(h, s * ny), : min(wd, s * nx)] = gx[:, :h, :wd]
        gx = full
    else:
        gx = xp.ascontiguousarray(gx)
    return gx[:, padding : h - padding, padding : wd - padding] if padding else gx


# Elements of the weight gradient's spectrum computed at once on NumPy (8 MB of float32): it
# is made and taken back to the kernel taps a block of input channels at a time, so the
# backward's peak holds a block of it beside grad_w, not the whole (F, 2, C, O) spectrum (27 MB
# per phase for PrimaryCaps, which peaked above PyTorch's training step at batch 32). A GPU
# takes each phase whole: fewer launches.
WEIGHT_GRAD_BLOCK = 1 << 21


def fourier_weight_grad(gs: Any, cache: Spectra, w_shape: tuple, stride: int) -> Any:
    """grad_w (O, C, KH, KW) from dY_f: dW_f = X_f^T conj(dY_f), back to the kernel taps.

    One polyphase component (phase) and one block of input channels at a time
    (:data:`WEIGHT_GRAD_BLOCK`)."""
    xp = backend.get_array_module(gs)
    xs, (bsz, _, _, c), g, plan = cache.input, cache.padded_shape, cache.grid, cache.plan
    o, _, kh, kw = w_shape
    s, f = stride, g["bins"]
    g2 = gs.reshape(f, 2 * bsz, o)
    # re = [Xr; Xi]^T [dYr; dYi], im = [Xr; Xi]^T [-dYi; dYr]
    g2_rot = xp.empty_like(g2)
    xp.negative(gs[:, 1], out=g2_rot[:, :bsz])
    g2_rot[:, bsz:] = gs[:, 0]
    uh, uw = plan.uh, plan.uw
    grad_w = xp.empty((o, c, kh, kw), dtype=gs.dtype)
    x2 = xs.reshape(f, 2 * bsz, s * s, c)
    blocks = -(-(2 * f * c * o) // WEIGHT_GRAD_BLOCK) if xp is np else 1
    width = -(-c // blocks)
    spec_buf = xp.empty(f * 2 * width * o, dtype=gs.dtype)
    taps = xp.empty((width, o, uh, uw), dtype=gs.dtype)
    for phase in range(s * s):
        p, q = divmod(phase, s)
        th, tw = len(range(p, kh, s)), len(range(q, kw, s))
        for lo in range(0, c, width):
            n = min(width, c - lo)
            xt = x2[:, :, phase, lo : lo + n].transpose(0, 2, 1)  # (F, n, 2B)
            spec = spec_buf[: f * 2 * n * o].reshape(f, 2, n, o)
            xp.matmul(xt, g2, out=spec[:, 0])
            xp.matmul(xt, g2_rot, out=spec[:, 1])
            # back to the sub-kernel taps, laid out (c, o, tap) so the final reordering moves runs of taps
            xp.matmul(spec.reshape(2 * f, n * o).T, plan.inv_taps.T, out=taps[:n].reshape(n * o, uh * uw))
            grad_w[:, lo : lo + n, p::s, q::s] = taps[:n, :, :th, :tw].transpose(1, 0, 2, 3)
    return grad_w


def conv2d_fourier_nhwc_backward(
    grad_y: Any, cache: Spectra, w: Any, stride: int = 1, padding: int = 0, need_input_grad: bool = True
) -> tuple[Any | None, Any, Any]:
    """Gradients (x, w, b) of :func:`conv2d_fourier_nhwc`; grad_y: (B, OH, OW, O).

    Returns (grad_x (B, H, W, C) or None, grad_w (O, C, KH, KW), grad_b (O,)).
    """
    gs = output_gradient_spectrum(grad_y, cache)
    grad_x = fourier_input_grad(gs, cache, stride, padding) if need_input_grad else None
    return grad_x, fourier_weight_grad(gs, cache, tuple(w.shape), stride), bias_grad(grad_y)


class SharedSpectrum:
    """One weight spectrum for the replicas of a layer that run a training step side by side
    (:mod:`capsnet.replicas`): the first replica to ask computes it, under a lock, and the
    others use it, instead of each holding its own (109 MB for PrimaryCaps). It answers only
    while open: :meth:`open` before the replicas' forwards, :meth:`close` after, so a call
    outside a replicated step (the model used on its own) computes its own spectrum."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keep = Workspace()
        self._spectrum: Any = None
        self._open = False

    def open(self, parties: int | None = None) -> None:
        """A new step (of ``parties`` replicas; any number share one spectrum): the weights
        may have changed since the last spectrum."""
        with self._lock:
            self._spectrum, self._open = None, True

    def close(self) -> None:
        with self._lock:
            self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def get(self, w: Any, stride: int, plan: _Plan, g: dict, work: Any = None) -> Any:
        with self._lock:
            if self._spectrum is None:
                self._spectrum = weight_spectrum(w, stride, plan, g, work, self._keep)
            return self._spectrum

    def release(self) -> None:
        with self._lock:
            self._spectrum = None
            self._keep.clear()

    @property
    def nbytes(self) -> int:
        return self._keep.nbytes

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the layer outside capsnet.replicas computes its own spectrum


class FourierConv:
    """What one convolution layer keeps between calls of the Fourier method, and its release.

    - In inference: a :class:`Workspace` of scratch reused call after call, and the
      weight spectrum (:class:`SpectrumCache`), reused while the weights are unchanged.
    - In training: the spectra arrays of the last step, handed back by its backward
      and reused by the next forward, so a step does not pay their page faults again.

    A training forward gives the inference memory back; an inference forward drops
    the training step's arrays. :meth:`release` frees everything; :attr:`nbytes`
    says how much is held. ``Conv2d`` owns one and calls :meth:`release` from
    ``Module.release``.
    """

    def __init__(self) -> None:
        self._scratch = Workspace()
        self._weights = SpectrumCache()
        self._spare: Workspace | None = None
        self._shared: SharedSpectrum | None = None  # the weight spectrum of replicated training steps

    def share_weight_spectrum(self, other: "FourierConv") -> SharedSpectrum:
        """Let ``other`` (the same layer in a replica of the model) use this layer's weight
        spectrum in training steps run between the holder's open() and close()."""
        if self._shared is None:
            self._shared = SharedSpectrum()
        other._shared = self._shared
        return self._shared

    def start_training(self) -> None:
        """Free what inference keeps (called by every training forward, whatever its method)."""
        self._scratch.clear()
        self._weights.clear()

    def forward(self, x_nhwc: Any, w: Any, b: Any | None, stride: int, padding: int,
                training: bool) -> tuple[Any, "FourierSaved"]:
        """:func:`conv2d_fourier_nhwc` with this layer's memory; returns (y, saved for :meth:`backward`)."""
        if training:
            self.start_training()
            # the spectra live in the saved state until backward; the last step's arrays,
            # handed back by its backward, are reused (a forward with no backward in
            # between gets fresh ones)
            work, keep, self._spare = None, self._spare or Workspace(), None
            weight_cache = self._shared if self._shared is not None and self._shared.is_open else None
        else:
            work = keep = self._scratch
            weight_cache = self._weights
            self._spare = None  # the training step's spectra arrays are not needed in inference
        y, cache = conv2d_fourier_nhwc(x_nhwc, w, b, stride, padding, work, keep, weight_cache)
        return y, FourierSaved(cache, keep)

    def backward(self, grad_y: Any, saved: "FourierSaved", w: Any, stride: int, padding: int,
                 need_input_grad: bool = True) -> tuple[Any | None, Any, Any]:
        """:func:`conv2d_fourier_nhwc_backward` of a training :meth:`forward`."""
        grads = conv2d_fourier_nhwc_backward(grad_y, saved.spectra, w, stride, padding, need_input_grad)
        self._spare = saved.keep
        return grads

    def release(self) -> None:
        """Free the scratch, the cached weight spectrum and the spare spectra arrays (and the
        spectrum shared with replicas)."""
        self.start_training()
        self._spare = None
        if self._shared is not None:
            self._shared.release()

    @property
    def nbytes(self) -> int:
        """Bytes held between calls (not counting a forward's state awaiting its backward)."""
        spare = self._spare.nbytes if self._spare is not None else 0
        shared = self._shared.nbytes if self._shared is not None else 0
        return self._scratch.nbytes + self._weights.nbytes + spare + shared

    @property
    def holds_weight_spectrum(self) -> bool:
        return self._weights.nbytes > 0

    @property
    def holds_spare(self) -> bool:
        return self._spare is not None


class FourierSaved(NamedTuple):
    """What the Fourier method's backward needs from its forward."""

    spectra: Spectra  # both spectra of the forward
    keep: Any  # the Workspace holding them, handed back to the layer by backward


class Fourier(Algorithm):
    """The polyphase Fourier method of this module as an engine algorithm: ungrouped
    convolutions, best for large kernels on small maps (PrimaryCaps' 9x9 stride 2). Holds
    the layer's memory between calls (:class:`FourierConv`)."""

    name = "fourier"
    scope = "ungrouped"

    def __init__(self) -> None:
        self.memory = FourierConv()

    def supports(self, g: ConvGeometry) -> bool:
        return g.groups == 1

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, FourierSaved]:
        return self.memory.forward(x_nhwc, w, b, g.stride, g.padding, training)

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> FourierSaved:
        _, cache = conv2d_fourier_nhwc(x_nhwc, w, None, g.stride, g.padding)
        return FourierSaved(cache, None)

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: FourierSaved, w: Any) -> Any:
        return fourier_input_grad(output_gradient_spectrum(grad_y, saved.spectra), saved.spectra, g.stride,
                                  g.padding)

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: FourierSaved, w: Any) -> Any:
        return fourier_weight_grad(output_gradient_spectrum(grad_y, saved.spectra), saved.spectra, tuple(w.shape),
                                   g.stride)

    def backward(self, g: ConvGeometry, grad_y: Any, saved: FourierSaved, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        if saved.keep is None:
            return conv2d_fourier_nhwc_backward(grad_y, saved.spectra, w, g.stride, g.padding, need_input_grad)
        return self.memory.backward(grad_y, saved, w, g.stride, g.padding, need_input_grad)

    def release(self) -> None:
        self.memory.release()

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes
