"""``python -m capsnet.visualize``: every figure writes a PNG of a sensible size whose
content is checked (reconstructions in [0, 1], perturbation rows that differ, coupling
maps that sum to 1 over the classes, ...); a clear message when matplotlib is missing."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from capsnet import visualize

plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.image import imread  # noqa: E402


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    """A small CapsNet trained one epoch on MNIST and one on MultiMNIST."""
    from capsnet.training import RunTrainer, TrainConfig  # noqa: PLC0415

    root = tmp_path_factory.mktemp("viz")
    small = {"conv_channels": 32, "primary_types": 8, "decoder_hidden": [64, 128]}
    common = dict(data_dir=str(mnist_dir), epochs=1, batch_size=50, test_limit=100)
    RunTrainer(TrainConfig(train_limit=1000, model=dict(small), **common), root / "mnist", progress=False,
                 log=False).fit()
    RunTrainer(TrainConfig(dataset="multimnist", train_limit=500, model=dict(small), **common), root / "multi",
                 progress=False, log=False).fit()
    return root


def png(path, min_h=100, min_w=100):
    image = imread(path)
    assert image.shape[0] >= min_h and image.shape[1] >= min_w, image.shape
    assert image[..., :3].std() > 0.02  # not a blank page
    return image


def run_cli(*args):
    return visualize.main([str(a) for a in args])


def test_reconstructions(runs, mnist_dir, tmp_path):
    from capsnet.training import load_model  # noqa: PLC0415

    model, _ = load_model(runs / "mnist" / "best.npz")
    from capsnet.data import load_mnist, to_float  # noqa: PLC0415

    x = to_float(load_mnist(mnist_dir, download=False, progress=False).test_images[:6, None])
    recon = visualize.reconstructions(model, x, tmp_path / "r.png")
    assert recon.shape == (6, 28, 28) and recon.min() >= 0 and recon.max() <= 1
    png(tmp_path / "r.png", 100, 300)
    assert run_cli("reconstructions", runs / "mnist" / "best.npz", "--out", tmp_path / "cli.png", "-n", "4",
                   "--data-dir", mnist_dir) == 0
    png(tmp_path / "cli.png")


def test_perturbation_grid_rows_differ(runs, mnist_dir, tmp_path):
    from capsnet.data import load_mnist, to_float  # noqa: PLC0415
    from capsnet.training import load_model  # noqa: PLC0415

    model, _ = load_model(runs / "mnist" / "best.npz")
    x = to_float(load_mnist(mnist_dir, download=False, progress=False).test_images[:1, None])
    grid = visualize.perturbation(model, x, tmp_path / "p.png")
    assert grid.shape == (16, 11, 28, 28)
    assert list(visualize.PERTURBATION_STEPS) == [-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    # the middle column is the unperturbed capsule: the same image in every row
    np.testing.assert_allclose(grid[:, 5], np.broadcast_to(grid[0, 5], grid[:, 5].shape), atol=1e-6)
    # each row moves its own dimension: the rows' changes differ from one another
    change = (grid[:, -1] - grid[:, 0]).reshape(16, -1)
    assert np.all(np.abs(change).max(axis=1) > 1e-3)
    diffs = [np.abs(change[a] - change[b]).max() for a in range(16) for b in range(a + 1, 16)]
    assert min(diffs) > 1e-4
    png(tmp_path / "p.png", 300, 200)


def test_multimnist_figure(runs, tmp_path, mnist_dir):
    out = tmp_path / "m.png"
    assert run_cli("multimnist", runs / "multi" / "best.npz", "--out", out, "-n", "5", "--data-dir", mnist_dir) == 0
    image = png(out, 100, 250)
    assert image.shape[-1] in (3, 4)
    # red and green both appear in the lower row: two reconstructions in two colours
    lower = image[image.shape[0] // 2:, :, :3]
    assert (lower[..., 0] - lower[..., 2]).max() > 0.2 and (lower[..., 1] - lower[..., 2]).max() > 0.2
    from capsnet.training import load_model  # noqa: PLC0415
    from capsnet.training.run import data_sources, TrainConfig  # noqa: PLC0415
    from capsnet.data import load_mnist  # noqa: PLC0415

    model, _ = load_model(runs / "multi" / "best.npz")
    _, test = data_sources(TrainConfig(dataset="multimnist", test_limit=20), load_mnist(mnist_dir, download=False,
                                                                                          progress=False), np)
    recon, pairs = visualize.multimnist(model, test.batch(np.arange(4))[0], tmp_path / "m2.png")
    assert recon.shape == (4, 2, 36, 36) and recon.min() >= 0 and recon.max() <= 1
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert run_cli("multimnist", runs / "mnist" / "best.npz", "--out", tmp_path / "x.png",
                   "--data-dir", mnist_dir) == 2


def test_curves_from_metrics_files(runs, tmp_path):
    data = visualize.curves([runs / "mnist", runs / "multi" / "metrics.jsonl"], tmp_path / "c.png")
    assert set(data) == {"mnist", "multi"}
    assert "test_error" in data["multi"] and "test_accuracy" in data["mnist"]
    png(tmp_path / "c.png", 200, 500)
    with pytest.raises(FileNotFoundError):
        visualize.curves([tmp_path / "nowhere"], tmp_path / "c2.png")
    record = json.loads((runs / "mnist" / "metrics.jsonl").read_text().splitlines()[0])
    assert data["mnist"]["test_accuracy"] == [record["test_accuracy"]]


def test_confusion_figure(runs, tmp_path, mnist_dir, monkeypatch):
    from capsnet.data import load_mnist  # noqa: PLC0415

    out = tmp_path / "conf.png"
    drawn = []
    draw = visualize.confusion
    monkeypatch.setattr(visualize, "confusion", lambda matrix, path, title: drawn.append((draw(matrix, path, title),
                                                                                          title)))
    assert run_cli("confusion", runs / "mnist" / "best.npz", "--out", out, "--test-limit", "100",
                   "--data-dir", mnist_dir) == 0
    png(out)
    (counts, title), = drawn  # the counts the command drew: rows are the true classes of the 100 test images
    labels = load_mnist(mnist_dir, download=False, progress=False).test_labels[:100]
    np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(labels, minlength=10))
    assert f"accuracy {np.trace(counts) / 100:.4f} on 100 test images" in title
    m = draw(np.diag(np.arange(10)), tmp_path / "d.png")
    np.testing.assert_array_equal(m, np.diag(np.arange(10)))
    png(tmp_path / "d.png")


def test_routing_maps_sum_to_one_over_classes(runs, mnist_dir, tmp_path):
    from capsnet.data import load_mnist, to_float  # noqa: PLC0415
    from capsnet.training import load_model  # noqa: PLC0415

    model, _ = load_model(runs / "mnist" / "best.npz")
    x = to_float(load_mnist(mnist_dir, download=False, progress=False).test_images[:1, None])
    maps = visualize.routing(model, x, tmp_path / "rt.png")
    assert maps.shape == (10, 6, 6)
    np.testing.assert_allclose(maps.sum(axis=0), 1, rtol=1e-5)
    assert maps.std(axis=0).max() > 1e-5  # routing has moved away from uniform
    _, c = model.routing(x)  # the maps are the coefficients averaged over the 8 types
    np.testing.assert_allclose(maps[:, 2, 3], c[0].reshape(8, 6, 6, 10)[:, 2, 3].mean(axis=0), rtol=1e-6)
    png(tmp_path / "rt.png", 200, 500)


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(ImportError, match=r"pip install 'capsnet\[viz\]'"):
        visualize.pyplot()
    assert run_cli("curves", tmp_path, "--out", tmp_path / "c.png") == 2
    assert "capsnet[viz]" in capsys.readouterr().err
