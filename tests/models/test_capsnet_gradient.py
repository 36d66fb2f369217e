"""The whole CapsNet chain in float64: the total loss (margin + reconstruction) is
gradient-checked w.r.t. the input image and every parameter, on every backend;
and the decoder sees the right capsule in training and in evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.layers import Module
from capsnet.models import CapsNet, CapsNetLoss

LABELS = np.array([1, 0])


def small_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6,), digit_init_std=1.0, input_grad=True, dtype="float64", seed=0)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


def images(host_rng, n=2):
    return host_rng.uniform(0, 1, (n, 1, 12, 12))


class TotalLoss(Module):
    """forward(x) -> the scalar CapsNetLoss with fixed labels; backward(g) -> dL/dx.

    The reconstruction target is a fixed copy of the first input, so perturbing
    x moves the loss only through the network (the quantity model.backward returns).
    """

    def __init__(self, model: CapsNet, labels, target):
        super().__init__()
        self.model = model
        self.labels = labels
        self.target = target
        self.criterion = CapsNetLoss()

    def forward(self, x):
        lengths, recon = self.model.forward(x, self.labels)
        return self.criterion(lengths, recon, self.labels, self.target)

    def backward(self, grad_out):
        return self.model.backward(*self.criterion.backward(grad_out))


def test_total_loss_gradient_wrt_input_and_every_parameter(xp, host_rng):
    # seed and scale chosen so that lengths land on both sides of both hinges, none near one
    model = small_capsnet(seed=4, digit_init_std=5.0)
    x_host = images(host_rng)
    x = backend.to_device(x_host)
    labels = backend.to_device(LABELS)
    wrapper = TotalLoss(model, labels, backend.to_device(x_host.copy()))

    # the check is only meaningful away from the margin-loss hinges
    lengths = backend.to_numpy(model.forward(x, labels)[0])
    assert np.all(np.abs(lengths - 0.9) > 0.02) and np.all(np.abs(lengths - 0.1) > 0.02), lengths
    present = lengths[np.arange(2), LABELS]
    assert np.any(present > 0.9) and np.any(present < 0.9), lengths
    criterion = CapsNetLoss()
    criterion(*model.forward(x, labels), labels, x)
    assert float(backend.to_numpy(criterion.margin)) > 0 and float(backend.to_numpy(criterion.reconstruction)) > 0

    results = check_module(wrapper, x, n_directions=12)
    names = [r.name for r in results]
    assert names == ["input"] + ["model." + n for n, _ in model.named_parameters()]
    assert names[1:] == ["model.conv1.weight", "model.conv1.bias", "model.primary.conv.weight",
                         "model.primary.conv.bias", "model.digit.weight", "model.decoder.0.weight",
                         "model.decoder.0.bias", "model.decoder.2.weight", "model.decoder.2.bias"]


def _decoder_input(v, labels):
    """What the decoder should see: v flattened with every capsule but labels' zeroed."""
    keep = np.arange(v.shape[1])[None, :] == labels[:, None]
    return (v * keep[..., None]).reshape(v.shape[0], -1)


def _decode(model, masked):
    model.decoder.eval()
    out = backend.to_numpy(model.decoder(backend.to_device(masked)))
    return out.reshape(-1, 1, 12, 12)


def test_training_mode_decoder_sees_the_label_capsule(xp, host_rng):
    model = small_capsnet()
    x = backend.to_device(images(host_rng, 4))
    model.eval()
    v = backend.to_numpy(model.capsules(x))
    longest = np.linalg.norm(v, axis=-1).argmax(axis=1)
    labels = (longest + 1) % 3  # never the longest: the mask must come from the labels
    model.train()
    lengths, recon = model.forward(x, backend.to_device(labels))
    expected = _decode(model, _decoder_input(v, labels))
    np.testing.assert_allclose(backend.to_numpy(recon), expected, rtol=1e-12, atol=1e-14)
    model.train()
    _, recon_other = model.forward(x, backend.to_device((labels + 1) % 3))
    assert not np.allclose(backend.to_numpy(recon_other), backend.to_numpy(recon))
    # without labels, training mode also falls back to the longest capsule
    _, recon_none = model.forward(x)
    np.testing.assert_allclose(backend.to_numpy(recon_none), _decode(model, _decoder_input(v, longest)),
                               rtol=1e-12, atol=1e-14)


def test_eval_mode_decoder_sees_the_longest_capsule_and_ignores_labels(xp, host_rng):
    model = small_capsnet()
    x = backend.to_device(images(host_rng, 4))
    model.eval()
    v = backend.to_numpy(model.capsules(x))
    longest = np.linalg.norm(v, axis=-1).argmax(axis=1)
    expected = _decode(model, _decoder_input(v, longest))
    model.eval()
    for labels in (None, (longest + 1) % 3, (longest + 2) % 3):
        _, recon = model.forward(x, None if labels is None else backend.to_device(labels))
        np.testing.assert_allclose(backend.to_numpy(recon), expected, rtol=1e-12, atol=1e-14)
    # reconstruct() with labels uses them; without, the longest
    np.testing.assert_allclose(backend.to_numpy(model.reconstruct(x)), expected, rtol=1e-12, atol=1e-14)
    other = (longest + 1) % 3
    np.testing.assert_allclose(backend.to_numpy(model.reconstruct(x, backend.to_device(other))),
                               _decode(model, _decoder_input(v, other)), rtol=1e-12, atol=1e-14)


def test_predict_returns_argmax_of_lengths(xp, host_rng):
    model = small_capsnet()
    x = backend.to_device(images(host_rng, 6))
    classes, lengths = model.predict(x)
    assert model.training  # predict restores the mode
    model.eval()
    expected_lengths, _ = model.forward(x)
    np.testing.assert_allclose(backend.to_numpy(lengths), backend.to_numpy(expected_lengths), rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(classes), backend.to_numpy(lengths).argmax(axis=1))
    v = backend.to_numpy(model.capsules(x))
    np.testing.assert_allclose(backend.to_numpy(lengths), np.linalg.norm(v, axis=-1), rtol=1e-12)


def test_backward_with_only_one_loss_part(xp, host_rng):
    x = backend.to_device(images(host_rng))
    labels = backend.to_device(LABELS)
    grads = {}
    for case in ("margin-only", "zero-recon-grad"):
        model = small_capsnet()
        lengths, recon = model.forward(x, labels)
        g_lengths = backend.to_device(np.linspace(-1, 1, 6).reshape(2, 3))
        g_recon = None if case == "margin-only" else backend.to_device(np.zeros(recon.shape))
        gx = model.backward(g_lengths, g_recon)
        grads[case] = [backend.to_numpy(gx)] + [backend.to_numpy(p.grad) for p in model.parameters()]
    for a, b in zip(grads["margin-only"], grads["zero-recon-grad"]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    model = small_capsnet()
    model.forward(x, labels)
    with pytest.raises(ValueError, match="needs grad_lengths, grad_recon or both"):
        model.backward(None, None)
