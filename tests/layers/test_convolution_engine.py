"""The convolution engine (capsnet.layers.convolution): every algorithm against the loop
oracle and PyTorch in float64 on awkward geometries, float64 gradient checks, the input
gradient as a gather (launches on the emulated device), and how "auto" chooses."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capsnet.gradcheck import check_module
from capsnet.layers import Conv2d, ConvTranspose2d
from capsnet.layers import convolution as engine
from capsnet.layers.conv import conv2d, conv2d_backward
from capsnet.layers.convolution import ConvGeometry, candidates, make
from capsnet.testing import device_counts
from tests.helpers import dev, host

F64 = "float64"

# (batch, height, width, in, out, kernel, stride, padding, groups): odd sizes, strides 1 and 2,
# padding, groups of 1, 2 and C, a depthwise kernel as large as its map, batch 1, 1x1 kernels
GEOMETRIES = [
    (2, 7, 6, 3, 4, 3, 1, 1, 1),
    (1, 9, 8, 4, 5, 3, 2, 0, 1),
    (2, 11, 9, 2, 3, 5, 2, 2, 1),
    (1, 20, 20, 3, 4, 9, 2, 0, 1),  # PrimaryCaps' geometry, few channels
    (2, 7, 7, 4, 6, 3, 1, 1, 2),
    (1, 9, 7, 6, 6, 3, 2, 1, 2),
    (2, 7, 6, 4, 4, 3, 2, 1, 4),  # depthwise, stride 2
    (2, 9, 9, 3, 3, 9, 1, 0, 3),  # Efficient-CapsNet's depthwise 9x9 on 9x9 maps
    (1, 6, 5, 3, 6, 3, 1, 1, 3),  # depthwise with a channel multiplier of 2
    (2, 5, 6, 4, 3, 1, 1, 0, 1),  # 1x1 stride 1: the pointwise GEMM
    (1, 7, 7, 4, 3, 1, 2, 1, 1),  # 1x1 with stride and padding: not pointwise
    (1, 8, 9, 3, 2, 3, 1, 0, 1),  # 3x3 stride 1 (Winograd too): odd output width, no padding
    (2, 5, 4, 2, 3, 3, 1, 2, 1),  # 3x3 stride 1 with padding 2: the widest Winograd takes
    (1, 3, 3, 2, 2, 3, 1, 0, 1),  # a single output pixel: one half-empty Winograd tile
]


def _geometry(case):
    b, h, w, c, o, k, s, p, g = case
    return ConvGeometry(b, h, w, c, o, k, k, s, p, g)


CASES = [(geometry, name) for geometry in GEOMETRIES for name in candidates(_geometry(geometry))]


def _ids(case):
    (b, h, w, c, o, k, s, p, g), name = case
    return f"{name}-b{b}-{h}x{w}-c{c}-o{o}-k{k}-s{s}-p{p}-g{g}"


def naive_grouped_conv2d(x, w, b, stride, padding, groups):
    """Per-group loop oracle over tests.helpers.naive_conv2d (itself loops over pixels)."""
    from tests.helpers import naive_conv2d  # noqa: PLC0415

    cg, og = x.shape[1] // groups, w.shape[0] // groups
    return np.concatenate([naive_conv2d(x[:, k * cg:(k + 1) * cg], w[k * og:(k + 1) * og],
                                        None if b is None else b[k * og:(k + 1) * og], stride, padding)
                           for k in range(groups)], axis=1)


def naive_grouped_conv2d_backward(gy, x, w, stride, padding, groups):
    from tests.helpers import naive_conv2d_backward  # noqa: PLC0415

    cg, og = x.shape[1] // groups, w.shape[0] // groups
    parts = [naive_conv2d_backward(gy[:, k * og:(k + 1) * og], x[:, k * cg:(k + 1) * cg], w[k * og:(k + 1) * og],
                                   stride, padding) for k in range(groups)]
    return (np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def test_every_geometry_has_im2col_and_the_specialists_where_they_apply():
    names = {tuple(geometry): [n for g2, n in CASES if g2 == geometry] for geometry in GEOMETRIES}
    assert all("im2col" in v for v in names.values())
    assert names[(2, 9, 9, 3, 3, 9, 1, 0, 3)] == ["im2col", "direct"]
    assert names[(2, 5, 6, 4, 3, 1, 1, 0, 1)] == ["im2col", "fourier", "pointwise"]
    assert "pointwise" not in names[(1, 7, 7, 4, 3, 1, 2, 1, 1)]
    winograd = {geometry for geometry, v in names.items() if "winograd" in v}
    assert winograd == {geometry for geometry, v in names.items() if "winograd4" in v}
    assert winograd == {(2, 7, 6, 3, 4, 3, 1, 1, 1), (1, 8, 9, 3, 2, 3, 1, 0, 1), (2, 5, 4, 2, 3, 3, 1, 2, 1),
                        (1, 3, 3, 2, 2, 3, 1, 0, 1)}  # 3x3, stride 1, one group


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_algorithm_matches_the_loop_oracle(xp, host_rng, case):
    (bsz, h, wd, c, o, k, s, p, groups), name = case
    x = host_rng.standard_normal((bsz, c, h, wd))
    w = host_rng.standard_normal((o, c // groups, k, k))
    b = host_rng.standard_normal(o)
    y = conv2d(dev(x), dev(w), dev(b), s, p, groups, algorithm=name)
    expected = naive_grouped_conv2d(x, w, b, s, p, groups)
    np.testing.assert_allclose(host(y), expected, rtol=1e-10, atol=1e-11)
    gy = host_rng.standard_normal(expected.shape)
    gx, gw, gb = conv2d_backward(dev(gy), dev(x), dev(w), s, p, groups, algorithm=name)
    ex, ew, eb = naive_grouped_conv2d_backward(gy, x, w, s, p, groups)
    np.testing.assert_allclose(host(gx), ex, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gw), ew, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gb), eb, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_algorithm_matches_pytorch_in_float64(xp, host_rng, torch, case):
    (bsz, h, wd, c, o, k, s, p, groups), name = case
    x = host_rng.standard_normal((bsz, c, h, wd))
    w = host_rng.standard_normal((o, c // groups, k, k))
    b = host_rng.standard_normal(o)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p, groups=groups)
    gy = host_rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(gy))
    layer = Conv2d(c, o, k, s, p, groups=groups, algorithm=name, dtype=F64, seed=0)
    layer.weight.data[...] = dev(w)
    layer.bias.data[...] = dev(b)
    y = layer.forward(dev(x))
    gx = layer.backward(dev(gy))
    np.testing.assert_allclose(host(y), yt.detach().numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gx), xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(layer.weight.grad), wt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(layer.bias.grad), bt.grad.numpy(), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_algorithm_gradcheck(xp, host_rng, case):
    (bsz, h, wd, c, o, k, s, p, groups), name = case
    layer = Conv2d(c, o, k, s, p, groups=groups, algorithm=name, dtype=F64, seed=1)
    results = check_module(layer, dev(host_rng.standard_normal((bsz, c, h, wd))))
    assert [r.name for r in results] == ["input", "weight", "bias"]


def test_a_pinned_algorithm_that_cannot_run_the_geometry_is_refused(xp, host_rng):
    layer = Conv2d(4, 4, 3, groups=2, algorithm="fourier", dtype=F64)
    with pytest.raises(ValueError, match="'fourier' cannot run .* ungrouped convolutions only"):
        layer.forward(dev(host_rng.standard_normal((1, 4, 5, 5))))
    with pytest.raises(ValueError, match="must be one of"):
        Conv2d(4, 4, 3, algorithm="winograd4x4")
    with pytest.raises(ValueError, match="'winograd' cannot run .* 3x3, stride-1, ungrouped"):
        Conv2d(4, 4, 3, stride=2, algorithm="winograd", dtype=F64).forward(dev(host_rng.standard_normal((1, 4, 7, 7))))


def test_the_saved_state_is_named(xp, host_rng):
    g = ConvGeometry(1, 6, 6, 2, 3, 3, 3, 1, 1, 1, F64)
    x, w = dev(host_rng.standard_normal((1, 6, 6, 2))), dev(host_rng.standard_normal((3, 2, 3, 3)))
    for name in candidates(g):
        _, saved = make(name).forward(g, x, w, None)
        assert hasattr(saved, "_fields"), f"{name} saves {type(saved).__name__}, not a NamedTuple"


def test_the_geometry_refuses_mismatched_weights():
    x, w = np.zeros((1, 5, 5, 4)), np.zeros((3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"expected weights of shape \(3, 4, KH, KW\).*got \(3, 3, 3, 3\)"):
        ConvGeometry.of(x, w)
    with pytest.raises(ValueError, match="output would be empty"):
        ConvGeometry(1, 2, 2, 1, 1, 3, 3)


# -- the input gradient is a gather -----------------------------------------------------------
def test_the_input_gradient_of_a_9x9_kernel_is_a_few_launches_not_81(emulated_cupy, host_rng):
    """PrimaryCaps' geometry at batch 1: the patch gradient goes back to the pixels by one
    index gather and one sum, not by a slice addition per kernel offset."""
    g = ConvGeometry(1, 20, 20, 8, 8, 9, 9, 2, 0, 1, F64, "cupy:0")
    alg = make("im2col")
    w = dev(host_rng.standard_normal((8, 8, 9, 9)))
    gy = dev(host_rng.standard_normal((1, 6, 6, 8)))
    with device_counts() as counts:
        alg.input_grad(g, gy, None, w)
    assert counts.launches <= 8, counts.summary()


# -- choosing ---------------------------------------------------------------------------------
@pytest.fixture
def fresh_choices():
    engine.clear_choices()
    yield
    engine.set_benchmark(None)
    engine.set_cost_model(None)
    engine.clear_choices()


def test_pinning_and_the_record_of_choices(fresh_choices, host_rng):
    layer = Conv2d(3, 4, 3, algorithm="im2col", dtype=F64)
    layer.forward(host_rng.standard_normal((2, 3, 6, 6)))
    auto = Conv2d(4, 4, 3, groups=4, dtype=F64)
    auto.eval()
    auto.forward(host_rng.standard_normal((2, 4, 6, 6)))
    listed = engine.choices()
    assert [(c["algorithm"], c["chosen_by"]) for c in listed][0] == ("im2col", "pinned")
    assert listed[1]["chosen_by"] == "cost model" and listed[1]["groups"] == 4 and listed[1]["training"] is False
    json.dumps(listed)  # what config.json records


def test_the_cost_model_decides_auto(fresh_choices):
    g = ConvGeometry(4, 9, 9, 8, 8, 3, 3, 1, 1, 8)
    table = {name: [0.0] * 5 for name in engine.ALGORITHMS}
    for favourite in ("im2col", "direct"):
        model = {"threads": {"1": {**table, favourite: [1e-9, 0, 0, 0, 0]}}}
        model["threads"]["1"] = {n: ([1.0, 0, 0, 0, 0] if n != favourite else [1e-9, 0, 0, 0, 0]) for n in table}
        engine.set_cost_model(model)
        assert engine.choose(g, training=True) == favourite


@pytest.mark.parametrize("name, tolerance", [("winograd", 1e-5), ("winograd4", 5e-5)])
def test_winograd_in_float32_stays_close_to_the_direct_method(xp, host_rng, name, tolerance):
    """Efficient-CapsNet's second 3x3 layer in float32: F(2x2, 3x3)'s transforms have entries
    0, 1/2 and 1 and stay within about 1e-6 of im2col (relative to the largest value); F(4x4,
    3x3)'s reach 8 and 1/24 and stay within about 1e-5."""
    g = ConvGeometry(4, 22, 22, 64, 64, 3, 3, 1, 0, 1, "float32")
    x = dev(host_rng.standard_normal((4, 22, 22, 64)).astype(np.float32))
    w = dev((host_rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32))
    gy = dev(host_rng.standard_normal((4, 20, 20, 64)).astype(np.float32))
    results = []
    for algorithm in ("im2col", name):
        alg = make(algorithm)
        y, saved = alg.forward(g, x, w, None)
        results.append([host(a) for a in (y, *alg.backward(g, gy, saved, w)[:2])])
    for direct, wino in zip(*results):
        assert wino.dtype == np.float32
        assert np.abs(wino - direct).max() <= tolerance * np.abs(direct).max()


@pytest.mark.parametrize("name", ["winograd", "winograd4"])
@pytest.mark.parametrize("size", [10, 11])  # output 8x8 (whole tiles for m = 2 and 4) and 9x9 (overhanging)
def test_winograd_output_in_whole_and_overhanging_tiles_matches_the_loop(xp, host_rng, name, size):
    from tests.helpers import naive_conv2d  # noqa: PLC0415

    g = ConvGeometry(2, size, size, 3, 4, 3, 3, 1, 0, 1, F64)
    x = host_rng.standard_normal((2, size, size, 3))
    w = host_rng.standard_normal((4, 3, 3, 3))
    y, _ = make(name).forward(g, dev(x), dev(w), None, training=False)
    assert y.flags.c_contiguous and y.shape == (2, size - 2, size - 2, 4)
    want = naive_conv2d(x.transpose(0, 3, 1, 2), w, None, 1, 0).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(host(y), want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ["winograd", "winograd4"])
def test_winograd_inference_kernel_follows_every_weight_change(xp, host_rng, name):
    """In evaluation, the transformed kernel is reused while the weights keep their values,
    and made again after any change: in place, a new array, another dtype; a training
    forward drops it and saves its own for the input gradient."""
    from tests.helpers import naive_conv2d  # noqa: PLC0415

    layer = Conv2d(3, 4, 3, padding=1, algorithm=name, dtype=F64, seed=0)
    layer.eval()
    x = host_rng.standard_normal((2, 3, 7, 6))

    def check():
        w, b = host(layer.weight.data), host(layer.bias.data)
        np.testing.assert_allclose(host(layer.forward(dev(x))), naive_conv2d(x, w, b, 1, 1), rtol=1e-10, atol=1e-12)

    check()
    kept = layer._instance(name)._kernel._value
    check()
    assert layer._instance(name)._kernel._value is kept  # reused
    assert layer._scratch_nbytes() == kept.nbytes + layer.weight.data.nbytes  # U and the weights' copy
    layer.weight.data[0, 0, 0, 0] += 1.0  # in place
    check()
    layer.weight.data = layer.weight.data * 0.5  # a new array
    check()
    layer.astype("float32")
    assert layer.forward(dev(x.astype(np.float32))).dtype == np.float32
    layer.astype("float64")
    check()
    layer.train()
    y = layer.forward(dev(x))
    assert layer._instance(name)._kernel.nbytes == 0  # a training forward drops it
    _, _, saved = layer._cache
    assert saved.U is not None and saved.U.shape == ((layer._instance(name).m + 2) ** 2, 3, 4)
    gy = host_rng.standard_normal(host(y).shape)
    layer.weight.grad[...] = 0
    gx = host(layer.backward(dev(gy)))
    from tests.helpers import naive_conv2d_backward  # noqa: PLC0415
    want = naive_conv2d_backward(gy, x, host(layer.weight.data), 1, 1)
    np.testing.assert_allclose(gx, want[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(host(layer.weight.grad), want[1], rtol=1e-9, atol=1e-11)
    layer.release()
    assert layer._scratch_nbytes() == 0


def test_a_cost_model_fitted_before_an_algorithm_existed_does_not_propose_it(fresh_choices):
    g = ConvGeometry(8, 22, 22, 64, 64, 3, 3, 1, 0, 1)
    assert "winograd" in candidates(g)
    without = {n: [1.0, 0, 0, 0, 0] for n in engine.ALGORITHMS if not n.startswith("winograd")}
    engine.set_cost_model({"threads": {"1": without}})
    assert engine.choose(g, training=True) != "winograd"
    engine.set_cost_model({"threads": {"1": {**without, "winograd": [1e-9, 0, 0, 0, 0]}}})
    assert engine.choose(g, training=True) == "winograd"


def test_the_shipped_cost_model_loads_and_names_every_algorithm():
    model = engine.load_cost_model()
    for table in model["threads"].values():
        assert set(table) <= set(engine.ALGORITHMS)
    assert model["machine"]["cpu_model"]


def test_a_broken_cost_model_names_the_fix(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"threads": {"1": {"im2col": [1.0]}}}))
    with pytest.raises(ValueError, match="fit_conv_cost.py"):
        engine.load_cost_model(path)


def test_benchmark_mode_times_the_candidates_once_per_geometry(fresh_choices, host_rng, monkeypatch):
    from capsnet.layers.convolution import select  # noqa: PLC0415

    timed = []
    real = select._time_once
    monkeypatch.setattr(select, "_time_once", lambda name, *a: timed.append(name) or real(name, *a))
    engine.set_benchmark(True)
    layer = Conv2d(4, 4, 3, groups=4, dtype=F64)
    x = host_rng.standard_normal((2, 4, 6, 6))
    for _ in range(2):
        layer.forward(x)
        layer.backward(np.ones((2, 4, 4, 4)))
    assert sorted(timed) == ["direct", "im2col"]
    assert engine.choices()[0]["chosen_by"] == "benchmark"


def test_benchmark_mode_follows_the_environment(fresh_choices, monkeypatch):
    monkeypatch.setenv(engine.BENCHMARK_ENV, "1")
    assert engine.benchmark_enabled()
    engine.set_benchmark(False)
    assert not engine.benchmark_enabled()


def test_conv_transpose_goes_through_the_engine(xp, host_rng, torch):
    layer = ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, dtype=F64, seed=0)
    x = host_rng.standard_normal((2, 3, 4, 5))
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(host(layer.weight.data), requires_grad=True)
    yt = torch.nn.functional.conv_transpose2d(xt, wt, torch.tensor(host(layer.bias.data)), stride=2, padding=1,
                                              output_padding=1)
    gy = host_rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(gy))
    y = layer.forward(dev(x))
    gx = layer.backward(dev(gy))
    np.testing.assert_allclose(host(y), yt.detach().numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(gx), xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(host(layer.weight.grad), wt.grad.numpy(), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", [(2, 7, 6, 3, 3, 1, 1), (1, 20, 20, 4, 9, 2, 0), (2, 9, 10, 2, 4, 3, 2),
                                  (2, 9, 9, 3, 9, 1, 0), (1, 5, 5, 2, 1, 2, 0)],
                         ids=["3x3-pad", "9x9-stride2", "4x4-stride3", "9x9-on-9x9", "1x1-stride2"])
def test_both_patch_gradient_sums_are_the_adjoint_of_the_gather(xp, host_rng, case):
    """The index gather (the GPU's) and the per-offset slice additions (NumPy's) give the
    same sums, and both are the adjoint of the patch gather: <im2col(x), y> = <x, col2im(y)>."""
    from capsnet.layers.convolution.patches import (  # noqa: PLC0415
        crop, im2col, patch_gradient_buffer, patch_gradient_sum)

    b, h, w, c, k, s, p = case
    x = host_rng.standard_normal((b, h, w, c))
    col = im2col(dev(x), k, k, s, p)
    y = host_rng.standard_normal(col.shape)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    sums = {}
    for method in ("gather", "offsets"):
        buf, front = patch_gradient_buffer(xp, y.shape[0], y.shape[1], c, y.dtype)
        front[...] = dev(y)
        sums[method] = host(crop(patch_gradient_sum(buf, (b, h + 2 * p, w + 2 * p, c), oh, ow, range(k), k, s,
                                                    method=method), p))
        np.testing.assert_allclose((host(col) * y).sum(), (x * sums[method]).sum(), rtol=1e-10)
    np.testing.assert_allclose(sums["gather"], sums["offsets"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["winograd", "winograd4"])
@pytest.mark.parametrize("per_block", [1, 2])
@pytest.mark.parametrize("size, padding", [(10, 1), (11, 0), (7, 2)])  # whole, overhanging and padded tiles
def test_winograd_in_blocks_of_images_matches_the_loop(host_rng, monkeypatch, name, per_block, size, padding):
    """On NumPy a Winograd call runs a block of images at a time (BLOCK_BYTES): blocks of one
    and of two images (the last one shorter) give the loop oracle's output and gradients,
    in training and in inference, with and without the input gradient."""
    from capsnet.layers.convolution import winograd  # noqa: PLC0415
    from tests.helpers import naive_conv2d, naive_conv2d_backward  # noqa: PLC0415

    alg = make(name)
    g = ConvGeometry(5, size, size, 3, 4, 3, 3, 1, padding, 1, F64)
    th, tw = winograd._tiles(g, alg.m)
    monkeypatch.setattr(winograd, "BLOCK_BYTES", per_block * (alg.m + 2) ** 2 * th * tw * 4 * 8)
    blocks = winograd._blocks(g, alg.m, 4, np)
    assert [hi - lo for lo, hi in blocks] == [per_block] * (5 // per_block) + [5 % per_block] * (5 % per_block > 0)
    x = host_rng.standard_normal((5, 3, size, size))
    w = host_rng.standard_normal((4, 3, 3, 3))
    b = host_rng.standard_normal(4)
    want = naive_conv2d(x, w, b, 1, padding)
    gy = host_rng.standard_normal(want.shape)
    ex, ew, eb = naive_conv2d_backward(gy, x, w, 1, padding)
    x_nhwc, gy_nhwc = x.transpose(0, 2, 3, 1), gy.transpose(0, 2, 3, 1)
    y, _ = alg.forward(g, x_nhwc, w, b, training=False)
    np.testing.assert_allclose(y.transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-11)
    y, saved = alg.forward(g, x_nhwc, w, b, training=True)
    np.testing.assert_allclose(y.transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-11)
    assert saved.V.shape[1] == 5 * th * tw
    gx, gw, gb = alg.backward(g, gy_nhwc, saved, w)
    np.testing.assert_allclose(gx.transpose(0, 3, 1, 2), ex, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gw, ew, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gb, eb, rtol=1e-10, atol=1e-11)
    none, gw2, _ = alg.backward(g, gy_nhwc, saved, w, need_input_grad=False)
    assert none is None
    np.testing.assert_allclose(gw2, ew, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(alg.input_grad(g, gy_nhwc, None, w).transpose(0, 3, 1, 2), ex, rtol=1e-10, atol=1e-11)
