"""The two-digit CapsNet of MultiMNIST (section 6): both digits are positives of the margin
loss, the decoder runs once per digit masked by that digit's capsule, the two longest
capsules are the prediction at test time; float64 gradient checks of the whole chain, and
the MultiMNIST run of ``python -m capsnet.train --dataset multimnist``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet import backend
from capsnet.gradcheck import check_module
from capsnet.data import both_right
from capsnet.layers import Mask, MarginLoss, Module, longest_capsules
from capsnet.layers.loss import margin_loss
from capsnet.models import CapsNet, CapsNetLoss
from capsnet.models import CapsNetTask

from test_layers import dev, host

PAIRS = np.array([[1, 0], [2, 1]])


def two_digit_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6,), digit_init_std=5.0, input_grad=True, dtype="float64", seed=4, digits=2)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


def test_mask_keeps_one_capsule_per_target_target_major(xp, host_rng):
    v = host_rng.standard_normal((2, 3, 4))
    out = host(Mask(2)(dev(v), dev(PAIRS)))
    assert out.shape == (4, 12)
    for t in range(2):
        for b in range(2):
            keep = np.zeros((3, 1))
            keep[PAIRS[b, t]] = 1
            np.testing.assert_array_equal(out[t * 2 + b], (v[b] * keep).ravel())


def test_mask_without_labels_keeps_the_two_longest_in_class_order(xp, host_rng):
    v = host_rng.standard_normal((2, 4, 3))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v *= np.array([[0.9, 0.1, 0.2, 0.8], [0.3, 0.7, 0.95, 0.1]])[..., None]
    out = host(Mask(2)(dev(v))).reshape(2, 2, 4, 3)  # (target, example, class, dim)
    kept = np.abs(out).sum(axis=-1) > 0
    assert kept[:, 0].nonzero()[1].tolist() == [0, 3]  # example 0: classes 0 and 3, in increasing order
    assert kept[:, 1].nonzero()[1].tolist() == [1, 2]


def longest_oracle(lengths, t):
    """Per example: the t longest classes in class order; ties as longest_capsules promises
    (t = 1: the lowest of the longest classes; t > 1: of equal lengths, the higher classes)."""
    out = []
    for row in lengths:
        if t == 1:
            out.append([min(j for j in range(len(row)) if row[j] == row.max())])
        else:
            out.append(sorted(sorted(range(len(row)), key=lambda j: (row[j], j))[-t:]))
    return np.array(out)


@pytest.mark.parametrize("classes", [3, 10, 40])  # 40: past the insertion-sort size of NumPy's default sort
@pytest.mark.parametrize("t", [1, 2, 3])
def test_longest_capsules_match_a_per_example_loop_ties_included(xp, host_rng, classes, t):
    lengths = host_rng.integers(0, 4, (64, classes)) / 4  # few distinct values: many ties at the cut
    got = longest_capsules(dev(lengths), t)
    assert backend.get_array_module(got) is xp and got.shape == (64, t) and got.dtype.kind in "iu"
    np.testing.assert_array_equal(host(got), longest_oracle(lengths, t))
    distinct = host_rng.permutation(classes * 64).reshape(64, classes).astype(float)
    np.testing.assert_array_equal(host(longest_capsules(dev(distinct), t)), longest_oracle(distinct, t))


def test_mask_and_both_right_choose_the_longest_capsules(xp, host_rng):
    v = host_rng.standard_normal((32, 10, 4))
    v[:, 3] = v[:, 7]  # equal lengths in every example
    chosen = longest_oracle((v * v).sum(-1), 2)
    kept = np.abs(host(Mask(2)(dev(v))).reshape(2, 32, 10, 4)).sum(-1) > 0  # (target, example, class)
    np.testing.assert_array_equal(kept.argmax(-1).T, chosen)
    scores = host_rng.integers(0, 3, (32, 10)) / 2
    labels = np.stack([host_rng.permutation(10)[:2] for _ in range(32)])  # the loop builds test data only
    expected = sum(sorted(labels[b]) == longest_oracle(scores[b:b + 1], 2)[0].tolist() for b in range(32))
    assert int(host(both_right(dev(scores), (None, dev(labels))))) == expected
    labels[:, 0], labels[:, 1] = longest_oracle(scores, 2).T
    assert int(host(both_right(dev(scores), (None, dev(labels[:, ::-1].copy()))))) == 32


def test_longest_capsules_refuses_what_it_cannot_choose(xp):
    with pytest.raises(ValueError, match=r"expected t an integer in \[1, 3\], got 4"):
        longest_capsules(dev(np.zeros((2, 3))), 4)
    with pytest.raises(ValueError, match=r"lengths of shape \(batch, n_caps\), got \(2, 3, 4\)"):
        longest_capsules(dev(np.zeros((2, 3, 4))), 1)


def test_gradcheck_two_target_mask(xp, host_rng):
    v = host_rng.standard_normal((2, 3, 4))
    check_module(Mask(2), dev(v), forward_kwargs={"labels": dev(PAIRS)})


def test_margin_loss_with_two_positives(xp, host_rng):
    lengths = host_rng.uniform(0, 1, (2, 3))
    expected = []
    for b in range(2):
        t = np.isin(np.arange(3), PAIRS[b]).astype(float)
        expected.append((t * np.maximum(0.9 - lengths[b], 0) ** 2
                         + 0.5 * (1 - t) * np.maximum(lengths[b] - 0.1, 0) ** 2).sum())
    np.testing.assert_allclose(float(host(margin_loss(dev(lengths), dev(PAIRS)))), np.mean(expected), rtol=1e-12)
    lengths[0] = [0.95, 0.05, 0.5]  # hinges on both sides, none near a corner
    lengths[1] = [0.6, 0.5, 0.3]
    check_module(MarginLoss(), dev(lengths), dev(PAIRS))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) or \(2, targets\)"):
        margin_loss(dev(lengths), dev(np.zeros((2, 2, 1), int)))


class TwoDigitLoss(Module):
    """forward(x) -> CapsNetLoss with fixed pairs, each digit's target fixed; backward -> dL/dx."""

    def __init__(self, model, labels, targets):
        super().__init__()
        self.model, self.labels, self.targets = model, labels, targets
        self.criterion = CapsNetLoss(recon_weight=0.05)

    def forward(self, x):
        lengths, recon = self.model.forward(x, self.labels)
        return self.criterion(lengths, recon, self.labels, self.targets)

    def backward(self, grad_out):
        return self.model.backward(*self.criterion.backward(grad_out))


def test_two_digit_total_loss_gradient(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(PAIRS)
    targets = dev(host_rng.uniform(0, 1, (2, 2, 1, 12, 12)))
    lengths = host(model.forward(x, labels)[0])
    assert np.all(np.abs(lengths - 0.9) > 0.02) and np.all(np.abs(lengths - 0.1) > 0.02), lengths
    results = check_module(TwoDigitLoss(model, labels, targets), x, n_directions=12)
    assert len(results) == 1 + len(list(model.parameters()))


def test_decoder_runs_once_per_digit_masked_by_its_capsule(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    model.eval()
    v = host(model.capsules(x))
    model.train()
    _, recon = model.forward(x, dev(PAIRS))
    assert recon.shape == (2, 2, 1, 12, 12)
    for t in range(2):
        keep = (np.arange(3)[None, :] == PAIRS[:, t][:, None])[..., None]
        expected = host(model.decode(dev(v * keep)))
        np.testing.assert_allclose(host(recon[:, t]), expected, rtol=1e-12, atol=1e-14)
    # test time: the two longest capsules, in increasing class order, whatever the labels
    model.eval()
    order = np.sort(np.argsort(np.linalg.norm(v, axis=-1), axis=1)[:, -2:], axis=1)
    _, recon_eval = model.forward(x, dev(PAIRS))
    for t in range(2):
        keep = (np.arange(3)[None, :] == order[:, t][:, None])[..., None]
        np.testing.assert_allclose(host(recon_eval[:, t]), host(model.decode(dev(v * keep))), rtol=1e-12, atol=1e-14)


def test_task_orders_the_targets_as_the_decoder_runs(xp, host_rng):
    model = two_digit_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    a, b = dev(host_rng.uniform(0, 1, (2, 1, 12, 12))), dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(np.array([[2, 0], [0, 1]]))
    model.train()
    np.testing.assert_array_equal(host(CapsNetTask.targets(model, (x, labels, a, b))), host(xp.stack([a, b], 1)))
    model.eval()
    t = host(CapsNetTask.targets(model, (x, labels, a, b)))
    np.testing.assert_array_equal(t[0], host(xp.stack([b[0], a[0]])))  # labels 2, 0: the digit of class 0 first
    np.testing.assert_array_equal(t[1], host(xp.stack([a[1], b[1]])))
    with pytest.raises(ValueError, match="then the 2 digits alone"):
        CapsNetTask().forward(model, (x, labels, a))


def test_routing_coefficients_sum_to_one_over_classes(xp, host_rng):
    model = two_digit_capsnet(digits=1)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    v, c = model.routing(x)
    assert c.shape == (2, model.config.n_primary_caps, 3)
    np.testing.assert_allclose(host(c).sum(axis=-1), 1, rtol=1e-12)
    model.eval()
    np.testing.assert_allclose(host(v), host(model.capsules(x)), rtol=1e-12)


def test_config_refuses_more_digits_than_classes():
    with pytest.raises(ValueError, match="digits must be an integer in"):
        CapsNet(n_classes=3, digits=4)


def test_multimnist_run_learns_and_resumes_exactly(mnist_dir, tmp_path):
    """A small two-digit CapsNet on 1,500 MultiMNIST pairs: the pair error falls well below
    what guessing gives (a random pair of classes is right 1 time in 45), and a run stopped
    after one epoch and resumed ends with the weights of one that never stopped."""
    from capsnet.training import MNISTTrainer, TrainConfig  # noqa: PLC0415

    base = dict(data_dir=str(mnist_dir), dataset="multimnist", batch_size=50, train_limit=1500, test_limit=200,
                test_pairs=2, model={"conv_channels": 32, "primary_types": 8, "decoder_hidden": [64, 128]})
    whole = MNISTTrainer(TrainConfig(epochs=2, **base), tmp_path / "whole", progress=False, log=False)
    history = whole.fit()
    assert len(history) == 2 and "test_error" in history[-1]
    assert history[-1]["test_error"] == pytest.approx(1 - history[-1]["test_accuracy"])
    assert history[-1]["test_accuracy"] > 3 / 45, history  # more than 3x guessing (0.118 when written)
    MNISTTrainer(TrainConfig(epochs=1, **base), tmp_path / "cut", progress=False, log=False).fit()
    resumed = MNISTTrainer(TrainConfig(epochs=2, **base), tmp_path / "cut", progress=False, log=False)
    resumed.fit(resume=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    # python -m capsnet.evaluate knows the checkpoint's dataset: the same fixed test pairs
    from capsnet.evaluate import main  # noqa: PLC0415

    out = tmp_path / "eval.json"
    assert main([str(tmp_path / "whole" / "checkpoint.npz"), "--data-dir", str(mnist_dir), "--test-limit", "200",
                 "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 400 and result["accuracy"] == pytest.approx(history[-1]["test_accuracy"])


def test_dataset_option_checks_the_model_input():
    from capsnet.training import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig(dataset="multimnist")
    assert cfg.max_shift == 4 and cfg.model["input_shape"] == [1, 36, 36] and cfg.model["digits"] == 2
    assert TrainConfig(dataset="expanded").max_shift == 6
    with pytest.raises(ValueError, match="CapsNet only"):
        TrainConfig(dataset="multimnist", arch="cnn")
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 40, 40\), but the model is configured for \(1, 28, 28\)"):
        TrainConfig(dataset="expanded", model={"input_shape": [1, 28, 28]}).validate()
    with pytest.raises(ValueError, match="at most 6 px"):
        TrainConfig(dataset="expanded", max_shift=7).validate()


def test_flop_count_runs_the_decoder_once_per_digit():
    from capsnet.models import CapsNetConfig  # noqa: PLC0415
    from capsnet.models.capsnet import flops_per_image  # noqa: PLC0415

    one, two = CapsNetConfig(input_shape=(1, 36, 36)), CapsNetConfig(input_shape=(1, 36, 36), digits=2)
    decoder = 160 * 512 + 512 * 1024 + 1024 * 36 * 36  # multiply-adds of one run
    # forward once, then the weight and input gradients: 3 products, 2 flops per multiply-add
    assert flops_per_image(two) - flops_per_image(one) == 2 * 3 * decoder
    assert flops_per_image(two, training=False) - flops_per_image(one, training=False) == 2 * decoder
