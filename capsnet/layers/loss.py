"""The losses: the CapsNet's margin loss (eq. 4) and reconstruction loss, and the softmax
cross-entropy (with label smoothing) of the baseline CNN, each a pure function, its
``*_backward`` and a Module. Each returns a 0-d array (no host sync on the GPU)."""
from __future__ import annotations

from typing import Any

from capsnet import backend
from capsnet.layers.base import Module, check_batch
from capsnet.layers.capsule import check_labels


def margin_loss(lengths: Any, labels: Any, m_plus: float = 0.9, m_minus: float = 0.1,
                lam: float = 0.5) -> Any:
    """Eq. 4: sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2,
    summed over classes k, averaged over the batch. lengths: (B, K), labels: (B,), or
    (B, T) for T present classes per example (MultiMNIST: T = 2, both digits positive)."""
    xp = backend.get_array_module(lengths)
    t = _one_hot(labels, lengths)
    present = xp.maximum(m_plus - lengths, 0)
    absent = xp.maximum(lengths - m_minus, 0)
    per_example = (t * present * present + lam * (1 - t) * absent * absent).sum(axis=1)
    return per_example.mean()


def margin_loss_backward(lengths: Any, labels: Any, m_plus: float = 0.9, m_minus: float = 0.1,
                         lam: float = 0.5, grad_out: Any = 1.0) -> Any:
    """Gradient of :func:`margin_loss` w.r.t. lengths, (B, K)."""
    xp = backend.get_array_module(lengths)
    t = _one_hot(labels, lengths)
    present = xp.maximum(m_plus - lengths, 0)
    absent = xp.maximum(lengths - m_minus, 0)
    return (-2 * t * present + 2 * lam * (1 - t) * absent) * (grad_out / lengths.shape[0])


def _one_hot(labels: Any, lengths: Any) -> Any:
    xp = backend.get_array_module(lengths)
    if lengths.ndim != 2:
        raise ValueError(f"margin loss expected lengths of shape (batch, n_classes), got {tuple(lengths.shape)}")
    b, k = lengths.shape
    check_batch("MarginLoss", tuple(lengths.shape))
    ndim = getattr(labels, "ndim", 1)
    if ndim not in (1, 2):
        raise ValueError(f"MarginLoss expected labels of shape ({b},) or ({b}, targets), got {tuple(labels.shape)}")
    targets = labels.shape[1] if ndim == 2 else 1
    check_labels("MarginLoss", labels, b, k, targets=targets)
    backend.get_array_module(lengths, labels)
    if targets == 1:
        return (xp.arange(k)[None, :] == labels[:, None]).astype(lengths.dtype)
    # T_k = 1 for every class present (a class named twice counts once)
    return (xp.arange(k)[None, None, :] == labels[:, :, None]).any(axis=1).astype(lengths.dtype)


class MarginLoss(Module):
    """Margin loss (eq. 4): m+ = 0.9, m- = 0.1, lambda = 0.5 by default.

    forward(lengths (B, K), labels (B,) or (B, T)) -> scalar; backward(grad=1) -> (B, K).
    """

    def __init__(self, m_plus: float = 0.9, m_minus: float = 0.1, lam: float = 0.5):
        super().__init__()
        self.m_plus, self.m_minus, self.lam = m_plus, m_minus, lam

    def extra_repr(self) -> str:
        return f"m_plus={self.m_plus}, m_minus={self.m_minus}, lam={self.lam}"

    def forward(self, lengths: Any, labels: Any) -> Any:
        loss = margin_loss(lengths, labels, self.m_plus, self.m_minus, self.lam)
        self._save(lengths, labels)
        return loss

    def backward(self, grad_out: Any = 1.0) -> Any:
        lengths, labels = self._pop()
        return margin_loss_backward(lengths, labels, self.m_plus, self.m_minus, self.lam, grad_out)


def reconstruction_loss(recon: Any, target: Any, weight: float = 0.0005) -> Any:
    """weight * sum of squared errors per image, averaged over the batch.
    recon, target: (B, ...) of the same shape."""
    if tuple(recon.shape) != tuple(target.shape):
        raise ValueError(
            f"reconstruction loss expected the reconstruction and the target to have one shape, "
            f"got {tuple(recon.shape)} and {tuple(target.shape)}"
        )
    check_batch("ReconstructionLoss", tuple(recon.shape))
    backend.get_array_module(recon, target)
    diff = recon - target
    # the factor in the array's own type: NumPy 1.x would promote a float32 sum times a Python float
    return (diff * diff).sum() * diff.dtype.type(weight / recon.shape[0])


def reconstruction_loss_backward(recon: Any, target: Any, weight: float = 0.0005, grad_out: Any = 1.0) -> Any:
    """Gradient of :func:`reconstruction_loss` w.r.t. recon."""
    return (recon - target) * (2 * weight / recon.shape[0] * grad_out)


class ReconstructionLoss(Module):
    """Sum of squared errors per image times ``weight`` (0.0005), mean over the batch.

    forward(recon, target) -> scalar; backward(grad=1) -> gradient w.r.t. recon.
    """

    def __init__(self, weight: float = 0.0005):
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    def forward(self, recon: Any, target: Any) -> Any:
        loss = reconstruction_loss(recon, target, self.weight)
        self._save(recon, target)
        return loss

    def backward(self, grad_out: Any = 1.0) -> Any:
        recon, target = self._pop()
        return reconstruction_loss_backward(recon, target, self.weight, grad_out)


def _log_softmax(logits: Any) -> Any:
    """log softmax over the classes (axis 1), by log-sum-exp with the maximum taken out."""
    xp = backend.get_array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def _targets(logits: Any, labels: Any, label_smoothing: float) -> Any:
    if logits.ndim != 2:
        raise ValueError(f"cross-entropy expected logits of shape (batch, n_classes), got {tuple(logits.shape)}")
    b, k = logits.shape
    check_batch("CrossEntropyLoss", tuple(logits.shape))
    check_labels("CrossEntropyLoss", labels, b, k)
    backend.get_array_module(logits, labels)
    xp = backend.get_array_module(logits)
    t = (xp.arange(k)[None, :] == labels[:, None]).astype(logits.dtype)
    if label_smoothing:
        t = t * logits.dtype.type(1 - label_smoothing) + logits.dtype.type(label_smoothing / k)
    return t


def cross_entropy(logits: Any, labels: Any, label_smoothing: float = 0.0) -> Any:
    """-sum_k t_k log softmax(logits)_k, averaged over the batch; t is the one-hot label,
    smoothed to (1 - s) one_hot + s / K with ``label_smoothing`` s. logits (B, K), labels (B,)."""
    t = _targets(logits, labels, label_smoothing)
    return -(t * _log_softmax(logits)).sum(axis=1).mean()


def cross_entropy_backward(logits: Any, labels: Any, label_smoothing: float = 0.0, grad_out: Any = 1.0) -> Any:
    """Gradient of :func:`cross_entropy` w.r.t. the logits, (B, K): (softmax - t) / B."""
    xp = backend.get_array_module(logits)
    t = _targets(logits, labels, label_smoothing)
    return (xp.exp(_log_softmax(logits)) - t) * (grad_out / logits.shape[0])


class CrossEntropyLoss(Module):
    """Softmax cross-entropy on logits, mean over the batch, integer labels; optional label
    smoothing. forward(logits (B, K), labels (B,)) -> scalar; backward(grad=1) -> (B, K)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"CrossEntropyLoss label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}" if self.label_smoothing else ""

    def forward(self, logits: Any, labels: Any) -> Any:
        loss = cross_entropy(logits, labels, self.label_smoothing)
        self._save(logits, labels)
        return loss

    def backward(self, grad_out: Any = 1.0) -> Any:
        logits, labels = self._pop()
        return cross_entropy_backward(logits, labels, self.label_smoothing, grad_out)
