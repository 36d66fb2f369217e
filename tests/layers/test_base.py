"""capsnet.layers.base: Module bookkeeping (state dicts, gradients that accumulate, train and
eval modes, backward before forward), dtypes kept and refused, empty batches, and the
caches a layer releases."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet import backend
from capsnet.layers import (
    CapsuleLength,
    Conv2d,
    DigitCaps,
    Flatten,
    Linear,
    MarginLoss,
    Mask,
    PrimaryCaps,
    ReLU,
    ReconstructionLoss,
    Sequential,
    Sigmoid,
    Squash,
    squash,
)
from capsnet.models import CapsNet, CapsNetConfig, CapsNetLoss

from tests.helpers import dev, host


F64 = "float64"


def small_capsnet(**overrides):
    kwargs = dict(input_shape=(1, 12, 12), conv_channels=4, conv_kernel=5, primary_types=2, primary_dim=4,
                  primary_kernel=5, primary_stride=2, digit_dim=4, n_classes=3, routing_iterations=3,
                  decoder_hidden=(6, 7), dtype=F64, seed=0)
    kwargs.update(overrides)
    return CapsNet(**kwargs)


# -- dtypes ------------------------------------------------------------------------------------
def _dtype_case(name, dtype, rng):
    """(module, forward inputs) for each module, in ``dtype``."""
    cast = lambda a: dev(np.asarray(a).astype(dtype))  # noqa: E731
    if name == "Linear":
        return Linear(4, 3, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 4)))]
    if name == "ReLU":
        return ReLU(), [cast(rng.standard_normal((2, 4)))]
    if name == "Sigmoid":
        return Sigmoid(), [cast(rng.standard_normal((2, 4)))]
    if name == "Squash":
        return Squash(), [cast(rng.standard_normal((2, 3, 4)))]
    if name == "CapsuleLength":
        return CapsuleLength(), [cast(rng.standard_normal((2, 3, 4)))]
    if name == "Conv2d":
        return Conv2d(2, 3, 3, stride=2, padding=1, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 2, 6, 6)))]
    if name == "PrimaryCaps":
        return PrimaryCaps(2, 2, 4, 3, 2, dtype=dtype, seed=0), [cast(rng.standard_normal((2, 2, 7, 7)))]
    if name == "DigitCaps":
        return DigitCaps(6, 4, 3, 5, 3, dtype=dtype, seed=0), [cast(squash(rng.standard_normal((2, 6, 4))))]
    if name == "Mask":
        return Mask(), [cast(rng.standard_normal((2, 3, 4))), dev(np.array([1, 2]))]
    if name == "MarginLoss":
        return MarginLoss(), [cast(rng.uniform(0, 1, (2, 3))), dev(np.array([1, 2]))]
    if name == "ReconstructionLoss":
        return ReconstructionLoss(), [cast(rng.uniform(0, 1, (2, 5))), cast(rng.uniform(0, 1, (2, 5)))]
    if name == "Sequential":
        return Sequential(Linear(4, 5, dtype=dtype, seed=0), ReLU(), Linear(5, 2, dtype=dtype, seed=1),
                          Sigmoid()), [cast(rng.standard_normal((2, 4)))]
    raise AssertionError(name)


DTYPE_CASES = ["Linear", "ReLU", "Sigmoid", "Squash", "CapsuleLength", "Conv2d", "PrimaryCaps", "DigitCaps",
               "Mask", "MarginLoss", "ReconstructionLoss", "Sequential"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_dtype_is_kept_forward_and_backward(xp, host_rng, name, dtype):
    module, inputs = _dtype_case(name, dtype, host_rng)
    out = module.forward(*inputs)
    assert out.dtype == np.dtype(dtype)
    assert backend.backend_of(out) == backend.get_backend()
    grad = module.backward(dev(np.ones(out.shape, dtype)))
    assert grad.dtype == np.dtype(dtype) and grad.shape == inputs[0].shape
    for pname, p in module.named_parameters():
        assert p.data.dtype == p.grad.dtype == np.dtype(dtype), pname
        assert np.any(host(p.grad) != 0), pname
    if name in ("MarginLoss", "ReconstructionLoss"):
        module.forward(*inputs)
        assert module.backward().dtype == np.dtype(dtype)  # the default grad_out = 1.0


def test_astype_casts_parameters_and_gradients(xp):
    layer = Linear(3, 2, seed=0)
    assert layer.dtype == np.float32
    layer.astype("float64")
    assert layer.weight.data.dtype == layer.weight.grad.dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64, got dtype int64"):
        layer.astype("int64")


@pytest.mark.parametrize("module_dtype,input_dtype", [("float32", "float64"), ("float64", "float32")])
@pytest.mark.parametrize("name", ["Linear", "Conv2d", "PrimaryCaps", "DigitCaps"])
def test_wrong_dtype_input_is_refused(name, module_dtype, input_dtype):
    rng = np.random.default_rng(0)
    module, inputs = _dtype_case(name, module_dtype, rng)
    x = inputs[0].astype(input_dtype)
    with pytest.raises(TypeError) as info:
        module.forward(x)
    assert module_dtype in str(info.value) and input_dtype in str(info.value)


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_backward_before_forward_raises(name):
    probe, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    out_shape = probe.forward(*inputs).shape
    module, _ = _dtype_case(name, "float64", np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        module.backward(np.ones(out_shape))


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_backward_twice_after_one_forward_raises(name):
    module, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    out = module.forward(*inputs)
    module.backward(np.ones(out.shape))
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        module.backward(np.ones(out.shape))


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_eval_forward_then_backward_raises(name):
    module, inputs = _dtype_case(name, "float64", np.random.default_rng(0))
    module.eval()
    out = module.forward(*inputs)
    with pytest.raises(RuntimeError, match=r"module\.train\(\)"):
        module.backward(np.ones(out.shape))
    module.train()
    out = module.forward(*inputs)
    module.backward(np.ones(out.shape))


def test_load_state_dict_errors():
    model = small_capsnet()
    state = model.state_dict()
    missing = dict(state)
    del missing["digit.weight"]
    with pytest.raises(KeyError) as info:
        model.load_state_dict(missing)
    assert "missing ['digit.weight']" in str(info.value) and "unexpected none" in str(info.value)

    extra = dict(state, **{"digit.bias": np.zeros(3)})
    with pytest.raises(KeyError) as info:
        model.load_state_dict(extra)
    assert "unexpected ['digit.bias']" in str(info.value) and "missing none" in str(info.value)

    wrong = dict(state)
    wrong["conv1.bias"] = np.zeros(5)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(wrong)
    assert "conv1.bias: expected (4,), got (5,)" in str(info.value)
    # a refused load changes nothing
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name])


def _capsnet_step(model, x, labels):
    lengths, recon = model.forward(x, labels)
    criterion = CapsNetLoss()
    criterion(lengths, recon, labels, x)
    model.backward(*criterion.backward())


def test_zero_grad_and_accumulation(xp, host_rng):
    model = small_capsnet()
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    labels = dev(np.array([1, 2]))
    _capsnet_step(model, x, labels)
    once = {n: host(p.grad).copy() for n, p in model.named_parameters()}
    assert all(np.any(g != 0) for g in once.values())
    _capsnet_step(model, x, labels)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(host(p.grad), 2 * once[name], rtol=1e-12, atol=1e-15, err_msg=name)
    model.zero_grad()
    assert all(np.all(host(p.grad) == 0) for p in model.parameters())


def test_state_dict_round_trip(xp, host_rng):
    a, b = small_capsnet(seed=0), small_capsnet(seed=1)
    x = dev(host_rng.uniform(0, 1, (2, 1, 12, 12)))
    a.eval()
    b.eval()
    assert not np.allclose(host(a.forward(x)[0]), host(b.forward(x)[0]))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    for (la, ra), (lb, rb) in [(a.forward(x), b.forward(x))]:
        np.testing.assert_array_equal(host(la), host(lb))
        np.testing.assert_array_equal(host(ra), host(rb))
    # state_dict holds copies, and loading casts to the parameter's dtype
    state["conv1.bias"][...] = 123
    assert not np.any(host(a.conv1.bias.data) == 123)
    c = small_capsnet(dtype="float32", seed=2)
    c.load_state_dict(a.state_dict())
    assert c.conv1.weight.data.dtype == np.float32
    np.testing.assert_allclose(host(c.conv1.weight.data), host(a.conv1.weight.data), rtol=1e-6)


def test_train_eval_recurse():
    model = small_capsnet()
    modules = list(model.modules())
    # the model, conv1, relu, primary and its conv, digit, length, mask, decoder and its 6 layers
    assert len(modules) == 15
    assert all(m.training for m in modules)
    assert model.eval() is model
    assert not any(m.training for m in modules)
    model.train()
    assert all(m.training for m in modules)
    model.train(False)
    assert not any(m.training for m in model.decoder)


def test_evaluating_switches_to_eval_and_restores_the_mode():
    model = small_capsnet()
    modules = list(model.modules())
    with model.evaluating() as inside:
        assert inside is model
        assert not any(m.training for m in modules)
        with model.evaluating():  # nested: still eval inside, and eval again after
            assert not any(m.training for m in modules)
        assert not any(m.training for m in modules)
    assert all(m.training for m in modules)
    model.eval()
    with model.evaluating():
        pass
    assert not any(m.training for m in modules)  # a model in eval mode stays there
    model.train()


def test_evaluating_restores_the_mode_when_the_block_raises():
    model = small_capsnet()
    with pytest.raises(RuntimeError, match="inside"):
        with model.evaluating():
            assert not model.training
            raise RuntimeError("inside")
    assert all(m.training for m in model.modules())


# -- empty batches and dtype hints ---------------------------------------------
def _empty_refused():
    small = dict(conv_channels=4, primary_types=2, primary_dim=4, digit_dim=4, decoder_hidden=(8,))
    return [
        ("Conv2d", lambda: Conv2d(1, 2, 3, dtype="float64"), [(0, 1, 5, 5)]),
        ("Linear", lambda: Linear(4, 3, dtype="float64"), [(0, 4)]),
        ("PrimaryCaps", lambda: PrimaryCaps(4, 2, 4, 3, 2, dtype="float64"), [(0, 4, 7, 7)]),
        ("DigitCaps", lambda: DigitCaps(6, 4, 3, 2, dtype="float64"), [(0, 6, 4)]),
        ("Mask", Mask, [(0, 3, 4)]),
        ("MarginLoss", MarginLoss, [(0, 10), "labels"]),
        ("ReconstructionLoss", ReconstructionLoss, [(0, 1, 4, 4), (0, 1, 4, 4)]),
        ("CapsNet", lambda: CapsNet(CapsNetConfig(**small), dtype="float64"), [(0, 1, 28, 28), "labels"]),
    ]


@pytest.mark.parametrize("name,make,shapes", _empty_refused(), ids=[c[0] for c in _empty_refused()])
def test_an_empty_batch_is_refused_with_the_library_message(xp, name, make, shapes):
    args = [dev(np.zeros(0, dtype=np.int64)) if s == "labels" else dev(np.zeros(s)) for s in shapes]
    with pytest.raises(ValueError, match=f"{name} got an empty batch"):
        make()(*args)


@pytest.mark.parametrize("layer,shape", [(ReLU(), (0, 3)), (Sigmoid(), (0, 3)), (Squash(), (0, 5, 4)),
                                         (CapsuleLength(), (0, 5, 4)), (Flatten(), (0, 2, 3))],
                         ids=["ReLU", "Sigmoid", "Squash", "CapsuleLength", "Flatten"])
def test_element_wise_layers_pass_an_empty_batch_through(xp, layer, shape):
    y = layer(dev(np.zeros(shape)))
    assert y.shape[0] == 0
    assert layer.backward(xp.zeros(y.shape)).shape == shape


def test_the_dtype_hint_offers_only_casts_that_work(xp):
    layer = Linear(4, 3)  # float32
    with pytest.raises(TypeError) as exc:
        layer(dev(np.zeros((2, 4), dtype=np.uint8)))
    message = str(exc.value)
    assert ".astype('float32')" in message and "to_float" in message
    assert "module with .astype('uint8')" not in message
    with pytest.raises(TypeError, match=r"or the module with \.astype\('float64'\)"):
        layer(dev(np.zeros((2, 4))))
    with pytest.raises(TypeError) as exc:
        layer(dev(np.zeros((2, 4), dtype=np.int32)))
    assert "module" not in str(exc.value)


def test_release_drops_caches_and_scratch(xp, host_rng):
    layer = Conv2d(3, 4, 5, stride=2, algorithm="fourier", dtype="float64", seed=0)
    layer.eval()
    layer(dev(host_rng.standard_normal((2, 3, 11, 11))))
    assert layer.held_nbytes() > 0
    layer.release()
    assert layer.held_nbytes() == 0
    layer.train()
    layer(dev(host_rng.standard_normal((2, 3, 11, 11))))
    assert layer.held_nbytes() > 0  # the training forward's cache
    layer.release()
    with pytest.raises(RuntimeError, match="without a cached forward pass"):
        layer.backward(dev(np.ones((2, 4, 4, 4))))
