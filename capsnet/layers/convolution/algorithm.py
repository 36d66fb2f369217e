"""Algorithm: what every convolution algorithm provides (forward, input gradient, weight
gradient over one ConvGeometry), and the bias gradient they share."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from capsnet import backend
from capsnet.layers.convolution.geometry import ConvGeometry

__all__ = ["Algorithm", "WeightCache", "bias_grad"]


class WeightCache:
    """What an algorithm makes from the weights alone (the Fourier method's weight spectrum,
    Winograd's transformed kernel), kept while the weights keep their values: for inference,
    where the same weights meet batch after batch.

    The weights are compared value by value with a copy taken when the value was made (a read
    of twice their size), so any change, in place or not, is seen (array_equal compares
    values: -0.0 counts as 0.0, and weights holding NaN are transformed every call). On CuPy
    the comparison waits for the device."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._weights: Any = None
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, w: Any, key: tuple, make: Callable[[], Any]) -> Any:
        """The value for weights ``w`` and the caller's ``key`` (what else it depends on):
        kept, or ``make()`` when either changed."""
        xp = backend.get_array_module(w)
        key = (*key, w.shape, w.dtype, *backend.device_key(w))
        if key != self._key or not bool(xp.array_equal(self._weights, w)):
            self.clear()
            self._value = make()
            self._weights, self._key = w.copy(), key
        return self._value

    @property
    def nbytes(self) -> int:
        """Bytes held: the value and the copy of the weights it was made from."""
        return sum(a.nbytes for a in (self._value, self._weights) if a is not None)


def bias_grad(grad_y: Any) -> Any:
    """Gradient of the bias: grad_y (B, OH, OW, O) summed over the pixels -> (O,)."""
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(axis=0)


class Algorithm:
    """One way of computing the convolution a :class:`ConvGeometry` describes.

    All arrays are channels-last: x (B, H, W, C), w (O, C / groups, KH, KW), y (B, OH, OW, O).
    ``forward`` returns (y, saved): ``saved`` is the algorithm's own named object holding what
    its gradients need. An instance may keep memory between calls (the Fourier method's
    spectra), which :meth:`release` frees; layers hold one instance per algorithm.
    """

    name: ClassVar[str]
    scope: ClassVar[str] = "any"  # the geometries it supports, in words for errors

    def supports(self, g: ConvGeometry) -> bool:
        return True

    def forward(self, g: ConvGeometry, x_nhwc: Any, w: Any, b: Any | None, training: bool = True
                ) -> tuple[Any, Any]:
        raise NotImplementedError

    def save(self, g: ConvGeometry, x_nhwc: Any, w: Any) -> Any:
        """What the gradients need, without the forward (the pure ``conv2d_backward``)."""
        return self.forward(g, x_nhwc, w, None, True)[1]

    def input_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        """Gradient of the input (B, H, W, C) from grad_y (B, OH, OW, O)."""
        raise NotImplementedError

    def weight_grad(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any) -> Any:
        """Gradient of the weights (O, C / groups, KH, KW) from grad_y (B, OH, OW, O)."""
        raise NotImplementedError

    def backward(self, g: ConvGeometry, grad_y: Any, saved: Any, w: Any, need_input_grad: bool = True
                 ) -> tuple[Any | None, Any, Any]:
        """(grad_x or None, grad_w, grad_b)."""
        gx = self.input_grad(g, grad_y, saved, w) if need_input_grad else None
        return gx, self.weight_grad(g, grad_y, saved, w), bias_grad(grad_y)

    def release(self) -> None:
        """Free memory kept between calls."""

    @property
    def nbytes(self) -> int:
        """Bytes kept between calls."""
        return 0
