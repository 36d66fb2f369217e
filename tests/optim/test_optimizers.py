"""capsnet.optim.optimizers: SGD and Adam against the published update rules, written out
here in plain float64 NumPy, on every backend and in float32 and float64; their state,
errors, and the chunked threaded updates."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from capsnet import backend
from capsnet.layers.base import Parameter
from capsnet.optim import SGD, Adam


SHAPES = [(3, 4), (5,)]


STEPS = 5


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-6) if np.dtype(dtype) == np.float32 else dict(rtol=1e-12, atol=1e-14)


def make_problem(host_rng, dtype, shapes=SHAPES, steps=STEPS):
    """Initial values and one gradient per step and parameter, drawn on the host and cast."""
    init = [host_rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[host_rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return init, grads


def make_params(xp, init):
    return [Parameter(xp.asarray(a.copy())) for a in init]


def set_grads(xp, params, grads):
    for p, g in zip(params, grads):
        p.grad[...] = xp.asarray(g)


# -- references: the published equations, float64, one parameter at a time --------
def sgd_reference(init, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """PyTorch's SGD: every step's parameters, in float64."""
    p = [a.astype(np.float64) for a in init]
    bufs = [None] * len(p)
    history = []
    for step_grads in grads:
        for i, grad in enumerate(step_grads):
            g = grad.astype(np.float64) + weight_decay * p[i]
            if momentum:
                bufs[i] = g.copy() if bufs[i] is None else momentum * bufs[i] + g
                update = g + momentum * bufs[i] if nesterov else bufs[i]
            else:
                update = g
            p[i] = p[i] - lr * update
        history.append([a.copy() for a in p])
    return history


def adam_reference(init, grads, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """Kingma & Ba, Algorithm 1, with L2 decay added to the gradient, in float64."""
    p = [a.astype(np.float64) for a in init]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        for i, grad in enumerate(step_grads):
            g = grad.astype(np.float64) + weight_decay * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g**2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append([a.copy() for a in p])
    return history


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "all": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
}


ADAM_CASES = {
    "default_betas": dict(lr=0.1),
    "weight_decay": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
}


def run_and_compare(xp, opt_cls, kwargs, reference, init, grads, dtype):
    params = make_params(xp, init)
    datas = [p.data for p in params]
    opt = opt_cls(params, **kwargs)
    for step, (step_grads, expected) in enumerate(zip(grads, reference)):
        set_grads(xp, params, step_grads)
        opt.step()
        for i, (p, want) in enumerate(zip(params, expected)):
            assert p.data is datas[i], "step must update p.data in place"
            assert p.data.dtype == dtype
            assert backend.backend_of(p.data) == backend.backend_of(xp.zeros(1))
            np.testing.assert_allclose(
                backend.to_numpy(p.data), want, **tolerances(dtype), err_msg=f"step {step + 1}, parameter {i}"
            )
    return opt, params


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_equations(xp, host_rng, dtype, case):
    kwargs = SGD_CASES[case]
    init, grads = make_problem(host_rng, dtype)
    reference = sgd_reference(init, grads, **kwargs)
    opt, params = run_and_compare(xp, SGD, kwargs, reference, init, grads, dtype)
    for p in params:
        for value in opt.state.get(p, {}).values():
            assert value.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_equations(xp, host_rng, dtype, case):
    kwargs = dict(ADAM_CASES[case])
    init, grads = make_problem(host_rng, dtype)
    b1, b2 = kwargs.get("betas", (0.9, 0.999))
    reference = adam_reference(
        init, grads, kwargs["lr"], b1, b2, kwargs.get("eps", 1e-8), kwargs.get("weight_decay", 0.0)
    )
    opt, params = run_and_compare(xp, Adam, kwargs, reference, init, grads, dtype)
    for p in params:
        assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
        for value in opt.state[p].values():
            assert value.dtype == dtype
            assert backend.backend_of(value) == backend.backend_of(p.data)


def test_adam_keeps_moments_across_steps(xp):
    """A constant gradient c gives m_t = (1-b1^t) c, v_t = (1-b2^t) c^2, so each step
    moves p by lr * c / (|c| + eps) exactly; moments reset every step would not."""
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-8
    c = np.array([0.5, -2.0, 3.0])
    p = Parameter(xp.zeros(3))
    opt = Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    for t in range(1, 7):
        p.grad[...] = xp.asarray(c)
        opt.step()
        m = backend.to_numpy(opt.state[p]["exp_avg"])
        v = backend.to_numpy(opt.state[p]["exp_avg_sq"])
        np.testing.assert_allclose(m, (1 - b1**t) * c, rtol=1e-12)
        np.testing.assert_allclose(v, (1 - b2**t) * c**2, rtol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(p.data), -t * lr * c / (np.abs(c) + eps), rtol=1e-12)
    assert opt.steps == 6


def test_adam_moments_are_per_parameter(xp):
    """Two parameters with different constant gradients each keep their own moments."""
    b1, b2 = 0.9, 0.999
    ca, cb = np.array([1.0, 2.0]), np.array([[-3.0], [0.25], [4.0]])
    a, b = Parameter(xp.zeros(2)), Parameter(xp.zeros((3, 1)))
    opt = Adam([a, b], lr=0.01, betas=(b1, b2))
    for t in range(1, 4):
        a.grad[...] = xp.asarray(ca)
        b.grad[...] = xp.asarray(cb)
        opt.step()
        for p, c in ((a, ca), (b, cb)):
            np.testing.assert_allclose(backend.to_numpy(opt.state[p]["exp_avg"]), (1 - b1**t) * c, rtol=1e-12)
            np.testing.assert_allclose(backend.to_numpy(opt.state[p]["exp_avg_sq"]), (1 - b2**t) * c**2, rtol=1e-12)
    assert opt.state[a]["exp_avg"] is not opt.state[b]["exp_avg"]


def test_state_is_lazy_and_on_the_parameters_device(xp):
    p = Parameter(xp.ones((2, 2), dtype=np.float32))
    opt = Adam([p])
    assert opt.state == {}
    assert not any(k.startswith("state.") for k in opt.state_dict())
    opt.step()
    for value in opt.state[p].values():
        assert backend.backend_of(value) == backend.backend_of(p.data)
        assert value.dtype == np.float32


def test_zero_grad(xp):
    params = [Parameter(xp.ones(3)), Parameter(xp.ones((2, 2), dtype=np.float32))]
    for p in params:
        p.grad[...] = 7
    SGD(params, lr=0.1).zero_grad()
    for p in params:
        assert float(abs(p.grad).sum()) == 0.0


def test_lr_is_a_plain_attribute(xp):
    p = Parameter(xp.zeros(2))
    opt = SGD([p], lr=0.1)
    p.grad[...] = 1.0
    opt.lr = 0.5
    opt.step()
    np.testing.assert_array_equal(backend.to_numpy(p.data), [-0.5, -0.5])


# -- checkpoints --------------------------------------------------------------------
def through_savez(state):
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        return {k: loaded[k] for k in loaded.files}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "opt_cls, kwargs",
    [
        (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (SGD, dict(lr=0.1)),
        (Adam, dict(lr=0.05, weight_decay=0.01)),
    ],
    ids=["sgd_nesterov", "sgd_plain", "adam"],
)
@pytest.mark.parametrize("via", ["savez", "pickle"])
def test_state_dict_round_trip_continues_identically(xp, host_rng, dtype, opt_cls, kwargs, via):
    init, grads = make_problem(host_rng, dtype, steps=6)
    unbroken = make_params(xp, init)
    opt = opt_cls(unbroken, **kwargs)
    for step_grads in grads[:3]:
        set_grads(xp, unbroken, step_grads)
        opt.step()
    opt.lr *= 0.5  # as a schedule would: the checkpoint must carry it
    saved = opt.state_dict()
    for key, value in saved.items():
        assert isinstance(value, (np.ndarray, str, bool, int, float)), key
    saved = through_savez(saved) if via == "savez" else pickle.loads(pickle.dumps(saved))

    resumed = make_params(xp, [backend.to_numpy(p.data) for p in unbroken])
    fresh = opt_cls(resumed, **{**kwargs, "lr": 1.0})
    fresh.load_state_dict(saved)
    assert fresh.lr == opt.lr and fresh.steps == 3
    for step_grads in grads[3:]:
        for params, o in ((unbroken, opt), (resumed, fresh)):
            set_grads(xp, params, step_grads)
            o.step()
        for a, b in zip(unbroken, resumed):
            # the same elementwise operations on the same device: bit for bit
            np.testing.assert_array_equal(backend.to_numpy(a.data), backend.to_numpy(b.data))
            assert b.data.dtype == dtype


def test_state_dict_holds_copies(host_rng):
    init, grads = make_problem(host_rng, np.float64)
    params = make_params(np, init)
    opt = Adam(params, lr=0.1)
    set_grads(np, params, grads[0])
    opt.step()
    saved = opt.state_dict()
    before = saved["state.0.exp_avg"].copy()
    set_grads(np, params, grads[1])
    opt.step()
    np.testing.assert_array_equal(saved["state.0.exp_avg"], before)
    assert saved["num_params"] == 2 and saved["steps"] == 1 and saved["optimizer"] == "Adam"
    # loading must not alias the caller's arrays either
    other = Adam(make_params(np, init), lr=0.1)
    other.load_state_dict(saved)
    other.step()
    np.testing.assert_array_equal(saved["state.0.exp_avg"], before)


def test_state_dict_before_any_step_round_trips(host_rng):
    init, grads = make_problem(host_rng, np.float64)
    a, b = make_params(np, init), make_params(np, init)
    opt_a = SGD(a, lr=0.1, momentum=0.9)
    opt_b = SGD(b, lr=0.5, momentum=0.5)  # other settings: the trajectories agree only if the load restores them
    opt_b.load_state_dict(opt_a.state_dict())
    assert (opt_b.lr, opt_b.momentum, opt_b.steps, opt_b.state) == (0.1, 0.9, 0, {})
    for step_grads in grads:
        for params, o in ((a, opt_a), (b, opt_b)):
            set_grads(np, params, step_grads)
            o.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.data, pb.data)


# -- errors -----------------------------------------------------------------------------
def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="expected Parameters, got ndarray at position 1"):
        SGD([Parameter(np.zeros(1)), np.zeros(1)], lr=0.1)
    p = Parameter(np.zeros(1))
    with pytest.raises(ValueError, match=r"same Parameter twice \(positions 0 and 2\)"):
        Adam([p, Parameter(np.zeros(1)), p])
    with pytest.raises(TypeError, match="single Parameter"):
        Adam(p)
    with pytest.raises(TypeError, match="floating-point"):
        SGD([Parameter(np.zeros(2, dtype=np.int64))], lr=0.1)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda ps: SGD(ps, lr=-0.1), ValueError, r"lr must be >= 0, got -0.1"),
        (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), ValueError, r"momentum must be >= 0, got -0.5"),
        (lambda ps: SGD(ps, lr=0.1, weight_decay=-1), ValueError, r"weight_decay must be >= 0, got -1.0"),
        (lambda ps: SGD(ps, lr=0.1, nesterov=True), ValueError, r"nesterov=True needs momentum > 0"),
        (lambda ps: SGD(ps, lr=float("nan")), ValueError, r"lr must be finite"),
        (lambda ps: SGD(ps, lr="0.1"), TypeError, r"lr must be a real number"),
        (lambda ps: Adam(ps, lr=-1e-3), ValueError, r"lr must be >= 0"),
        (lambda ps: Adam(ps, betas=(0.9, 1.0)), ValueError, r"beta2 must be in \[0, 1\), got 1.0"),
        (lambda ps: Adam(ps, betas=0.9), TypeError, r"betas must be a pair"),
        (lambda ps: Adam(ps, eps=-1.0), ValueError, r"eps must be >= 0"),
        (lambda ps: Adam(ps, weight_decay=-0.1), ValueError, r"weight_decay must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_rejected(make, error, message):
    with pytest.raises(error, match=message):
        make([Parameter(np.zeros(2))])


def test_negative_lr_set_by_hand_is_caught_at_step():
    opt = SGD([Parameter(np.zeros(2))], lr=0.1)
    opt.lr = -1.0
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()


def test_mismatched_grad_is_rejected():
    p = Parameter(np.zeros(3, dtype=np.float32))
    p.grad = np.zeros(3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"parameter 0 has data \(3,\) float32 but grad \(3,\) float64"):
        SGD([p], lr=0.1).step()


def stepped_adam(shapes):
    params = [Parameter(np.ones(s)) for s in shapes]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad[...] = 0.5
    opt.step()
    return opt


def test_load_state_dict_checks_the_parameters():
    saved = stepped_adam([(2, 3), (4,)]).state_dict()
    with pytest.raises(ValueError, match=r"expected state for 3 parameters .* got state for 2"):
        stepped_adam([(2, 3), (4,), (1,)]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"state.1.exp_avg: expected \(5,\), got \(4,\)"):
        stepped_adam([(2, 3), (5,)]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"expected a state dict saved by SGD, got one from 'Adam'"):
        SGD([Parameter(np.ones((2, 3))), Parameter(np.ones(4))], lr=0.1).load_state_dict(saved)
    target = stepped_adam([(2, 3), (4,)])
    incomplete = {k: v for k, v in saved.items() if k != "state.1.exp_avg_sq"}
    with pytest.raises(KeyError, match=r"parameter 1 has state \['exp_avg'\]"):
        target.load_state_dict(incomplete)
    with pytest.raises(KeyError, match=r"unexpected key 'state.0.velocity'"):
        target.load_state_dict({**saved, "state.0.velocity": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        target.load_state_dict({**saved, "beta1": 1.5})
    # a failed load leaves the optimizer as it was
    assert target.beta1 == 0.9 and target.steps == 1


@pytest.mark.parametrize("make", [lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3),
                                  lambda ps: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)],
                         ids=["adam", "sgd"])
def test_chunked_threaded_updates_equal_one_pass_bit_for_bit(make, monkeypatch):
    """On the CPU the updates run in chunks on several threads: the same numbers as one
    call per array on one thread (element-wise work, nothing reduced)."""
    from capsnet.optim import optimizers  # noqa: PLC0415

    rng = np.random.default_rng(0)
    shapes = [(3 * optimizers.CHUNK + 17,), (700, 1000), (5,)]
    data = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    def run(chunk, threads):
        monkeypatch.setattr(optimizers, "CHUNK", chunk)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        params = [Parameter(d.copy()) for d in data]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad[...] = g
            opt.step()
        opt.zero_grad()
        assert all(not p.grad.any() for p in params)
        return [p.data for p in params]

    one = run(1 << 40, 1)
    assert optimizers.host_threads() == 1
    for a, b in zip(one, run(1 << 16, 2)):
        np.testing.assert_array_equal(a, b)


def test_host_threads_follows_the_thread_variables(monkeypatch):
    from capsnet.optim import host_threads  # noqa: PLC0415

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert host_threads() == 1
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert host_threads() >= 1


def test_each_chunk_updates_with_its_own_state_names(monkeypatch):
    """The state of every parameter is matched by name even when the dicts list their
    arrays in different orders (as a loaded state may)."""
    rng = np.random.default_rng(1)
    data = [rng.standard_normal((50,)).astype(np.float32) for _ in range(2)]
    grad = [rng.standard_normal((50,)).astype(np.float32) for _ in range(2)]
    results = []
    for reorder in (False, True):
        params = [Parameter(d.copy()) for d in data]
        opt = Adam(params, lr=0.1)
        for p, g in zip(params, grad):
            p.grad[...] = g
        opt.step()
        if reorder:
            opt.state[params[0]] = dict(reversed(list(opt.state[params[0]].items())))
        opt.step()
        results.append([p.data.copy() for p in params])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_device_arrays_are_updated_on_the_calling_thread(monkeypatch):
    """Updates of parameters that are not on NumPy run on the caller's thread (a CUDA
    device and stream belong to a thread): simulated by reporting every array as CuPy."""
    import threading  # noqa: PLC0415

    from capsnet.optim import optimizers  # noqa: PLC0415

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    params = [Parameter(np.ones(10, np.float32)) for _ in range(4)]
    opt = Adam(params)
    seen = set()
    update = opt._update
    monkeypatch.setattr(opt, "_update", lambda *a: (seen.add(threading.current_thread().name), update(*a)))
    monkeypatch.setattr(optimizers.backend, "backend_of", lambda array: "cupy")
    opt.step()
    assert seen == {threading.current_thread().name}
