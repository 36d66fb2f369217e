"""Batch normalisation (Ioffe and Szegedy, 2015): ``batch_norm`` / ``batch_norm_backward``
with ``BatchNorm1d`` and ``BatchNorm2d``.

In training each channel is normalised by the mean and the (biased) variance of the
batch, then scaled by ``weight`` and shifted by ``bias``; the running statistics move
towards the batch's by ``momentum`` (running = (1 - momentum) running + momentum batch,
the variance unbiased), as in PyTorch. In eval mode the running statistics are used.

Replicas of a model training one batch side by side (:mod:`capsnet.replicas`) normalise the
whole batch together: each layer's replicas share a :class:`BatchGroup`, through which they
exchange their per-image channel sums, so the statistics and gradients are those of the whole
batch, bit for bit, as PyTorch's SyncBatchNorm does across processes.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from capsnet import backend
from capsnet.layers.base import Buffer, Module, check_input, init_param

__all__ = ["BatchGroup", "BatchNorm1d", "BatchNorm2d", "batch_norm", "batch_norm_backward",
           "batch_norm_inference", "inference_affine"]

# gather(part (b, n)) -> (B, n): the rows of every replica of the batch, in replica order
Gather = Callable[[Any], Any]


def _axes_and_shape(x: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The reduced axes (all but the channel axis 1) and the broadcast shape of a channel vector."""
    axes = (0, *range(2, x.ndim))
    return axes, (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _channels_last(x: Any) -> bool:
    """Whether x (B, C, H, W) is a view of channels-last memory (B, H, W, C), as the
    convolutions return it: then the channel statistics are column sums of an (N, C) matrix."""
    return x.ndim == 4 and x.transpose(0, 2, 3, 1).flags.c_contiguous


def _image_sums(rows: Any, batch: int) -> Any:
    """rows (N, C), N = batch x pixels -> (batch, C), each image's column sums: one product
    with a vector of ones (BLAS: 0.03 ms for 16 images of 22 x 22 x 64 on one core, where
    NumPy's sum over the middle axis took 0.16 ms)."""
    xp = backend.get_array_module(rows)
    per_image = rows.reshape(batch, -1, rows.shape[1])
    return xp.matmul(xp.ones(per_image.shape[1], dtype=rows.dtype), per_image)


def _column_sum(rows: Any, batch: int, gather: Gather | None = None) -> Any:
    """rows (N, C), N = batch x pixels -> (C,): summed per image first, then over the batch,
    so float32 rounding grows with the pixels plus the batch, not with their product. With
    ``gather`` the per-image sums of every replica's slice are summed, in batch order: the
    sum of the whole batch, the same bits as one replica computing it."""
    per_image = _image_sums(rows, batch)
    return (per_image if gather is None else gather(per_image)).sum(axis=0)


_ROW_BLOCK = 1 << 14  # elements per row of the reshaped rows in _per_channel


def _per_channel(op: Any, rows: Any, vector: Any, out: Any = None) -> Any:
    """op(rows, vector) for rows (N, C), contiguous, and a channel vector (C,): the same values
    as NumPy's broadcasting, which calls its inner loop once per row of C (0.125 ms for
    7,744 rows of 64 on one core). On NumPy, k rows at a time form one row of 16K elements
    against the vector repeated k times (0.076 ms); CuPy broadcasts in one kernel as it is."""
    xp = backend.get_array_module(rows, vector)
    out = xp.empty_like(rows) if out is None else out
    n, c = rows.shape
    k = _ROW_BLOCK // c
    if xp is not np or k < 2 or n < 2 * k or not (rows.flags.c_contiguous and out.flags.c_contiguous):
        return op(rows, vector, out=out)
    m = n // k * k
    op(rows[:m].reshape(-1, k * c), np.tile(vector, k), out=out[:m].reshape(-1, k * c))
    if m < n:
        op(rows[m:], vector, out=out[m:])
    return out


def batch_norm(x: Any, weight: Any, bias: Any, eps: float = 1e-5, mean: Any = None,
               var: Any = None, gather: Gather | None = None) -> tuple[Any, tuple]:
    """x (B, C, ...) -> (y, saved for the backward). Channel statistics of the batch when
    ``mean`` and ``var`` are None (training), else the given ones (eval). The saved state
    holds x-hat, 1 / std, the batch mean and biased variance (for the running statistics)
    and the number of values per channel they were taken over.

    ``gather`` (training, :meth:`BatchGroup.gather`): x is one replica's slice of a batch and
    the statistics are the whole batch's, from every replica's per-image sums.

    A (B, C, H, W) view of channels-last memory, as the convolutions return, is computed as
    (B H W, C) rows and stays channels-last: the same values, without strided reductions."""
    xp = backend.get_array_module(x, weight)
    if _channels_last(x):
        b, c, h, w = x.shape
        rows = x.transpose(0, 2, 3, 1).reshape(-1, c)
        n = rows.shape[0]
        if mean is None:
            per_image = _image_sums(rows, b)
            if gather is not None:
                per_image = gather(per_image)
                n = per_image.shape[0] * h * w
            mean = per_image.sum(axis=0) / x.dtype.type(n)
            xhat = _per_channel(xp.subtract, rows, mean)
            var = _column_sum(xhat * xhat, b, gather) / x.dtype.type(n)
        else:
            xhat = _per_channel(xp.subtract, rows, mean)
        inv_std = 1 / xp.sqrt(var + x.dtype.type(eps))
        _per_channel(xp.multiply, xhat, inv_std, out=xhat)
        y = _per_channel(xp.multiply, xhat, weight)
        _per_channel(xp.add, y, bias, out=y)
        return (y.reshape(b, h, w, c).transpose(0, 3, 1, 2),
                (xhat.reshape(b, h, w, c).transpose(0, 3, 1, 2), inv_std, mean, var, n))
    axes, shape = _axes_and_shape(x)
    n = x.size // x.shape[1]
    if mean is None and gather is not None:  # per-image sums of the slice, gathered
        b, c = x.shape[:2]
        whole = gather(x.reshape(b, c, -1).sum(axis=2))
        n = whole.shape[0] * (n // b)
        mean = whole.sum(axis=0) / x.dtype.type(n)
        centred = x - mean.reshape(shape)
        var = gather((centred * centred).reshape(b, c, -1).sum(axis=2)).sum(axis=0) / x.dtype.type(n)
    elif mean is None:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
    inv_std = 1 / xp.sqrt(var + x.dtype.type(eps))
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    y = xhat * weight.reshape(shape) + bias.reshape(shape)
    return y, (xhat, inv_std, mean, var, n)


def inference_affine(weight: Any, bias: Any, mean: Any, var: Any, eps: float = 1e-5) -> tuple[Any, Any]:
    """(scale, shift), each (C,): eval-mode batch norm as the per-channel map x scale + shift,
    scale = weight / sqrt(var + eps), shift = bias - mean scale."""
    xp = backend.get_array_module(weight, mean)
    scale = weight / xp.sqrt(var + var.dtype.type(eps))
    return scale, bias - mean * scale


def batch_norm_inference(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float = 1e-5) -> Any:
    """Eval-mode batch norm, x (B, C, ...) -> y of x's shape: with the given (running)
    statistics it is one affine map per channel, y = x scale + shift with
    scale = weight / sqrt(var + eps) and shift = bias - mean scale (as PyTorch's CPU kernel
    folds it), two passes over x where :func:`batch_norm` makes four and keeps x-hat for a
    backward that evaluation never runs. Equal to ``batch_norm(x, weight, bias, eps, mean,
    var)[0]`` up to float rounding; a channels-last view stays channels-last."""
    scale, shift = inference_affine(weight, bias, mean, var, eps)
    if _channels_last(x):
        b, c, h, w = x.shape
        xp = backend.get_array_module(x, scale)
        y = _per_channel(xp.multiply, x.transpose(0, 2, 3, 1).reshape(-1, c), scale)
        _per_channel(xp.add, y, shift, out=y)
        return y.reshape(b, h, w, c).transpose(0, 3, 1, 2)
    _, shape = _axes_and_shape(x)
    y = x * scale.reshape(shape)
    y += shift.reshape(shape)
    return y


def batch_norm_backward(grad_out: Any, saved: tuple, weight: Any,
                        batch_statistics: bool = True, gather: Gather | None = None) -> tuple[Any, Any, Any]:
    """Gradients (x, weight, bias) of :func:`batch_norm`. With ``batch_statistics`` the
    mean and variance depend on x (training), else they are constants (eval). With
    ``gather`` (as given to the forward) the weight and bias gradients are the whole batch's,
    and so is the input gradient's dependence through the statistics: every replica gets
    the same weight and bias gradients, so add only one replica's into the parameters."""
    xhat, inv_std, n = saved[0], saved[1], saved[4]
    if _channels_last(xhat):
        xp = backend.get_array_module(grad_out, xhat)
        b, c, h, w = xhat.shape
        xhat_rows = xhat.transpose(0, 2, 3, 1).reshape(-1, c)
        g_rows = xp.ascontiguousarray(grad_out.transpose(0, 2, 3, 1)).reshape(-1, c)
        if gather is None:
            g_bias = _column_sum(g_rows, b)
            g_weight = _column_sum(g_rows * xhat_rows, b)
        else:  # both per-image sums in one exchange: (b, 2C) rows
            both = gather(xp.concatenate([_image_sums(g_rows, b), _image_sums(g_rows * xhat_rows, b)], axis=1))
            g_bias, g_weight = both[:, :c].sum(axis=0), both[:, c:].sum(axis=0)
        scale = weight * inv_std
        if not batch_statistics:
            gx = _per_channel(xp.multiply, g_rows, scale)
        else:
            count = grad_out.dtype.type(n)
            gx = _per_channel(xp.multiply, xhat_rows, g_weight / count)
            _per_channel(xp.add, gx, g_bias / count, out=gx)
            xp.subtract(g_rows, gx, out=gx)
            _per_channel(xp.multiply, gx, scale, out=gx)
        return gx.reshape(b, h, w, c).transpose(0, 3, 1, 2), g_weight, g_bias
    axes, shape = _axes_and_shape(grad_out)
    if gather is None:
        g_bias = grad_out.sum(axis=axes)
        g_weight = (grad_out * xhat).sum(axis=axes)
    else:
        xp = backend.get_array_module(grad_out, xhat)
        b, c = grad_out.shape[:2]
        both = gather(xp.concatenate([grad_out.reshape(b, c, -1).sum(axis=2),
                                      (grad_out * xhat).reshape(b, c, -1).sum(axis=2)], axis=1))
        g_bias, g_weight = both[:, :c].sum(axis=0), both[:, c:].sum(axis=0)
    scale = (weight * inv_std).reshape(shape)
    if not batch_statistics:
        return grad_out * scale, g_weight, g_bias
    gx = scale * (grad_out - (g_bias.reshape(shape) + xhat * g_weight.reshape(shape)) / grad_out.dtype.type(n))
    return gx, g_weight, g_bias


class BatchGroup:
    """The replicas of one batch-norm layer that normalise one batch together
    (:mod:`capsnet.replicas`): replica k's layer is member k (the model's own layer is 0).

    Between :meth:`open` (with the number of replicas taking part) and :meth:`close` each of
    them calls :meth:`gather` from its own thread with its slice's per-image rows, and gets
    back every member's rows in member order, which is batch order. Every member must call it
    the same number of times, all at once: the replicas run on threads of their own, and a
    replica that fails calls :meth:`abort` so that none waits for it. Outside an open step
    the layer normalises what it is given."""

    waits_for_members = True  # capsnet.replicas runs the members' jobs at once, on threads of their own

    def __init__(self) -> None:
        self.members = 1
        self._parties = 0
        self._barrier: threading.Barrier | None = None
        self._parts: list = []
        self._whole: Any = None

    def join(self) -> int:
        """A new member's index."""
        self.members += 1
        return self.members - 1

    def open(self, parties: int) -> None:
        """A step of ``parties`` replicas (members 0 .. parties - 1) begins."""
        if not 1 <= parties <= self.members:
            raise ValueError(f"BatchGroup of {self.members} members cannot open a step of {parties}")
        if parties > 1 and (self._barrier is None or self._barrier.parties != parties or self._barrier.broken):
            self._barrier = threading.Barrier(parties, action=self._join_parts)
        self._parts = [None] * parties
        self._parties = parties

    def close(self) -> None:
        self._parties = 0
        self._parts = []
        self._whole = None

    def abort(self) -> None:
        """Release every member waiting in :meth:`gather`, with threading.BrokenBarrierError
        (a replica failed: the others must not wait for it)."""
        if self._barrier is not None:
            self._barrier.abort()

    @property
    def is_open(self) -> bool:
        """Whether a step of more than one replica is under way."""
        return self._parties > 1

    def gather(self, index: int, part: Any) -> Any:
        """Every member's ``part`` (b_k, n), joined along the first axis in member order; waits
        for all of them."""
        self._parts[index] = part
        self._barrier.wait()
        return self._whole

    def _join_parts(self) -> None:  # run by one member once all have arrived, before any leaves
        xp = backend.get_array_module(*self._parts)
        self._whole = xp.concatenate(self._parts, axis=0)

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the layer outside capsnet.replicas normalises on its own


class _BatchNorm(Module):
    _ndims: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *, dtype: Any = "float32"):
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name} num_features must be an integer >= 1, got {num_features!r}")
        if not (0 <= momentum <= 1):
            raise ValueError(f"{name} momentum must be in [0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"{name} eps must be > 0, got {eps!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = init_param((num_features,), 0.0, dtype, None, kind="zeros")
        self.weight.data[...] = 1
        self.bias = init_param((num_features,), 0.0, dtype, None, kind="zeros")
        self.running_mean = Buffer(init_param((num_features,), 0.0, dtype, None, kind="zeros").data)
        self.running_var = Buffer(self.weight.data.copy())
        self._group: BatchGroup | None = None  # the layer's replicas in capsnet.replicas
        self._member = 0

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: Any) -> Any:
        name = type(self).__name__
        if getattr(x, "ndim", None) not in self._ndims:
            raise ValueError(f"{name} expected input of shape {self._layout}, got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        check_input(name, x, (None, self.num_features) + (None,) * (x.ndim - 2), self.weight.dtype)
        backend.get_array_module(x, self.weight.data)  # one device
        if self.training:
            per_channel = x.size // self.num_features
            if per_channel < 2:
                raise ValueError(f"{name} in training mode needs more than one value per channel to take batch "
                                 f"statistics, got input of shape {tuple(x.shape)}; use a batch of 2 or more, "
                                 "or call .eval() to use the running statistics")
            gather = self._gather()
            y, saved = batch_norm(x, self.weight.data, self.bias.data, self.eps, gather=gather)
            m = x.dtype.type(self.momentum)
            count = saved[4]
            unbiased = saved[3] * x.dtype.type(count / (count - 1))
            self.running_mean.data *= 1 - m
            self.running_mean.data += m * saved[2]
            self.running_var.data *= 1 - m
            self.running_var.data += m * unbiased
            self._save(saved, gather)
            return y
        self._save()  # evaluation keeps nothing for a backward
        return batch_norm_inference(x, self.weight.data, self.bias.data, self.running_mean.data,
                                    self.running_var.data, self.eps)

    def inference_affine(self) -> tuple[Any, Any]:
        """(scale, shift), each (C,): what evaluation computes, x scale + shift per channel,
        from the running statistics; a convolution before it folds them into its weights
        (:meth:`capsnet.layers.Conv2d.folded_with`)."""
        return inference_affine(self.weight.data, self.bias.data, self.running_mean.data, self.running_var.data,
                                self.eps)

    def share_with_replica(self, replica: "_BatchNorm") -> BatchGroup:
        """Make ``replica`` (this layer in a copy of the model, :mod:`capsnet.replicas`) the next
        member of this layer's :class:`BatchGroup`; returns the group, opened and closed
        around each step."""
        if self._group is None:
            self._group, self._member = BatchGroup(), 0
        replica._group, replica._member = self._group, self._group.join()
        return self._group

    def _gather(self) -> Gather | None:
        group = self._group
        if group is None or not group.is_open:
            return None
        member = self._member
        return lambda part: group.gather(member, part)

    def backward(self, grad_out: Any) -> Any:
        saved, gather = self._pop()
        if gather is not None and not self._group.is_open:
            raise RuntimeError(f"{type(self).__name__}.backward of a forward that normalised a batch with its "
                               "replicas needs them again: run it through the same capsnet.replicas.Replicas")
        gx, gw, gb = batch_norm_backward(grad_out, saved, self.weight.data, gather=gather)
        if gather is None or self._member == 0:  # replicas computed the same whole-batch gradients
            self.weight.grad += gw
            self.bias.grad += gb
        return gx


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (B, C) or (B, C, L) inputs, per channel C; weight and bias (C,)."""

    _ndims = (2, 3)
    _layout = "(batch, C) or (batch, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (B, C, H, W) inputs, per channel C; weight and bias (C,)."""

    _ndims = (4,)
    _layout = "(batch, C, H, W)"
