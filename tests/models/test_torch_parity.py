"""Parity with a plain PyTorch CapsNet (scripts/torch_capsnet.py) on identical weights.

Float64, the paper-sized model, a few real MNIST images with their real labels:
capsule lengths, reconstructions (masked by label in training mode, by the
longest capsule in eval mode), both losses, every parameter gradient, and two
Adam steps must agree with PyTorch's autograd and torch.optim.Adam.
"""
from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from capsnet import backend  # noqa: E402
from capsnet.data import load_mnist, to_float  # noqa: E402
from capsnet.models.capsnet import CapsNet, CapsNetLoss  # noqa: E402
from capsnet.optim import Adam  # noqa: E402

from tests.helpers import reference  # noqa: E402

_ref = reference("torch_capsnet")
TorchCapsNet, margin_loss, reconstruction_loss, total_loss = (_ref.TorchCapsNet, _ref.margin_loss,
                                                              _ref.reconstruction_loss, _ref.total_loss)

BATCH = 4
RTOL = 1e-6
ATOL_OF_MAX = 1e-9  # elementwise atol, as a fraction of the reference's largest magnitude


def assert_close(ours, ref, what: str) -> float:
    """‖a−b‖/‖b‖ <= RTOL and elementwise allclose; returns the relative error."""
    a = np.asarray(backend.to_numpy(ours), dtype=np.float64)
    b = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs torch {b.shape}"
    scale = float(np.abs(b).max()) if b.size else 0.0
    norm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(a - b)) / norm if norm > 0 else float(np.linalg.norm(a - b))
    worst = np.unravel_index(np.argmax(np.abs(a - b)), a.shape) if a.size else ()
    assert rel <= RTOL, f"{what}: relative error {rel:.3e} > {RTOL:g}; worst at {worst}: {a[worst]!r} vs {b[worst]!r}"
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL_OF_MAX * scale, err_msg=what)
    return rel


@pytest.fixture(scope="module", autouse=True)
def _numpy_backend_few_threads():
    # Batch-4 float64 products gain nothing from many threads; restore torch's setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 4))
    with backend.use("numpy"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(mnist_dir):
    data = load_mnist(mnist_dir, download=False, progress=False)
    x = to_float(data.train_images[:BATCH], "float64", xp=np)
    y = data.train_labels[:BATCH].astype(np.int64)
    return x, y


def make_pair(seed: int = 0):
    ours = CapsNet(dtype="float64", seed=seed)
    ref = TorchCapsNet(dtype=torch.float64)
    ref.load_from_capsnet(ours.state_dict())
    return ours, ref


@pytest.fixture(scope="module", params=["im2col", "fourier"])
def training_pass(batch, request):
    """One training-mode forward and backward through both models, with PrimaryCaps'
    convolution computed by each of our two methods."""
    x, y = batch
    ours, ref = make_pair()
    ours.primary.conv.algorithm = request.param
    ours.train()
    crit = CapsNetLoss()
    lengths, recon = ours(x, y)
    loss = crit(lengths, recon, y, x)
    ours.backward(*crit.backward())

    ref.train()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    t_lengths, t_recon = ref(tx, ty)
    t_margin = margin_loss(t_lengths, ty)
    t_recon_loss = reconstruction_loss(t_recon, tx)
    (t_margin + t_recon_loss).backward()
    return {
        "ours": ours, "ref": ref, "loss": loss, "tensors": (tx, ty),
        "lengths": (lengths, t_lengths), "recon": (recon, t_recon),
        "margin": (crit.margin, t_margin), "reconstruction": (crit.reconstruction, t_recon_loss),
    }


def test_weights_round_trip():
    ours, ref = make_pair()
    back = ref.capsnet_state_dict()
    assert list(back) == list(ours.state_dict())
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("what", ["lengths", "recon", "margin", "reconstruction"])
def test_training_forward_and_losses(training_pass, what):
    ours, ref = training_pass[what]
    assert_close(ours, ref, what)


def test_total_loss(training_pass):
    tx, ty = training_pass["tensors"]
    t_total = total_loss(training_pass["lengths"][1], training_pass["recon"][1], ty, tx)
    torch.testing.assert_close(t_total, training_pass["margin"][1] + training_pass["reconstruction"][1])
    assert_close(training_pass["loss"], t_total, "total loss")


def test_every_parameter_gradient(training_pass):
    ours, ref = training_pass["ours"], training_pass["ref"]
    t_params = dict(ref.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(t_params)
    for name, p in ours.named_parameters():
        assert t_params[name].grad is not None, name
        assert_close(p.grad, t_params[name].grad, f"gradient of {name}")


def test_eval_masks_by_longest_capsule(batch):
    x, y = batch
    ours, ref = make_pair()
    ours.eval()
    ref.eval()
    lengths, recon = ours(x, y)
    with torch.no_grad():
        t_lengths, t_recon = ref(torch.from_numpy(x), torch.from_numpy(y))
    # Untrained, the longest capsule is rarely the label: the two masks really differ.
    assert (lengths.argmax(axis=1) != y).any()
    assert_close(lengths, t_lengths, "eval lengths")
    assert_close(recon, t_recon, "eval recon")
    np.testing.assert_array_equal(lengths.argmax(axis=1), t_lengths.argmax(dim=1).numpy())


def test_two_adam_steps(batch):
    x, y = batch
    ours, ref = make_pair()
    before = ours.state_dict()
    opt = Adam(ours.parameters(), lr=1e-3)
    t_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    crit = CapsNetLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(2):
        opt.zero_grad()
        lengths, recon = ours(x, y)
        crit(lengths, recon, y, x)
        ours.backward(*crit.backward())
        opt.step()

        t_opt.zero_grad()
        t_lengths, t_recon = ref(tx, ty)
        (margin_loss(t_lengths, ty) + reconstruction_loss(t_recon, tx)).backward()
        t_opt.step()
    t_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.data, t_params[name], f"{name} after 2 Adam steps")
        # The weights barely move in two steps, so compare the moves themselves too.
        moved, t_moved = p.data - before[name], t_params[name].detach().numpy() - before[name]
        rel = np.linalg.norm(moved - t_moved) / np.linalg.norm(t_moved)
        assert rel <= RTOL, f"{name}: Adam's update differs from torch's by {rel:.3e} (relative)"


def test_float32_reference_runs(batch):
    x, y = batch
    ours = CapsNet(dtype="float32", seed=0)
    ref = TorchCapsNet(dtype=torch.float32)
    ref.load_from_capsnet(ours.state_dict())
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    x32 = x.astype(np.float32)
    lengths, recon = ours(x32, y)
    t_lengths, t_recon = ref(torch.from_numpy(x32), torch.from_numpy(y))
    assert t_lengths.dtype == t_recon.dtype == torch.float32
    np.testing.assert_allclose(lengths, t_lengths.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(recon, t_recon.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_two_digit_multimnist_network(mnist_dir):
    """The MultiMNIST network (36x36, 3,200 primary capsules, two digits per image): lengths,
    both reconstructions (masked by each digit's label in training, by the two longest
    capsules at test time), both losses and every parameter gradient, in float64."""
    from capsnet.data import MultiMNIST  # noqa: PLC0415

    data = load_mnist(mnist_dir, download=False, progress=False)
    pairs = MultiMNIST(data.test_images[:50], data.test_labels[:50], train=False, dtype="float64")
    with backend.use("numpy"):
        x, y, a, b = pairs.batch(np.arange(3))
    ours = CapsNet(input_shape=(1, 36, 36), digits=2, dtype="float64", seed=1)
    assert ours.config.n_primary_caps == 3200
    ref = TorchCapsNet(input_shape=(1, 36, 36), digits=2, dtype=torch.float64)
    ref.load_from_capsnet(ours.state_dict())
    targets = np.stack([a, b], axis=1)
    crit = CapsNetLoss()
    lengths, recon = ours(x, y)
    loss = crit(lengths, recon, y, targets)
    ours.backward(*crit.backward())
    tx, ty, tt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(targets)
    ref.train()
    t_lengths, t_recon = ref(tx, ty)
    t_loss = total_loss(t_lengths, t_recon, ty, tt)
    t_loss.backward()
    assert_close(lengths, t_lengths, "lengths")
    assert_close(recon, t_recon, "reconstructions")
    assert_close(loss, t_loss, "total loss")
    t_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, t_params[name].grad, f"gradient of {name}")
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(ours(x)[1], ref(tx)[1], "test-time reconstructions (two longest capsules)")
