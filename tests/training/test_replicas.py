"""Replicas (capsnet/replicas.py): a model replica per host thread, a slice of the batch each;
the thread count and the BLAS thread count (capsnet/parallel.py)."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet import backend, parallel
from capsnet import slices as slices_module
from capsnet.data import ArrayDataset, random_shift
from capsnet.layers import BatchNorm1d, BatchNorm2d, Dropout, Linear, Mask, Sequential
from capsnet.models import CapsNet, CapsNetConfig, CapsNetLoss
from capsnet.optim import Adam
from capsnet.replicas import Replicas, replicate, split_reason
from capsnet.training import CapsNetTask, Trainer

from tests.helpers import FailsOnMarkedRows, conv_net


@pytest.fixture(autouse=True)
def split_small_batches(monkeypatch):
    """These tests split batches of a few examples; the library splits a training batch only
    into slices of MIN_TRAIN_SLICE or more (tested below with its own value)."""
    monkeypatch.setattr(slices_module, "MIN_TRAIN_SLICE", 1)


pytestmark = pytest.mark.skipif(parallel.blas_threads() is None,
                                reason="the BLAS thread count cannot be controlled here (no OpenBLAS loaded)")

SMALL = dict(conv_channels=16, primary_types=4, primary_dim=8, digit_dim=8, decoder_hidden=(32, 64))


def capsnet_steps(threads, steps=3, batch=12, dtype="float32", seed=0, algorithm="auto"):
    """A small CapsNet after ``steps`` Adam steps on fixed data, run through ``threads`` replicas
    (the model itself for 1); returns (model, last loss, gradients of the last step)."""
    rng = np.random.default_rng(5)
    x = rng.random((batch, 1, 28, 28)).astype(dtype)
    y = np.arange(batch) % 10
    model = CapsNet(CapsNetConfig(**SMALL), dtype=dtype, seed=seed)
    model.primary.conv.algorithm = algorithm
    crit, opt = CapsNetLoss(), Adam(model.parameters(), lr=1e-3)
    runner = model if threads == 1 else Replicas(model, threads)
    for _ in range(steps):
        lengths, recon = runner(x, y)
        loss = crit(lengths, recon, y, x)
        opt.zero_grad()
        runner.backward(*crit.backward())
        grads = {name: p.grad.copy() for name, p in model.named_parameters()}
        opt.step()
    return model, float(loss), grads


def test_the_threaded_step_repeats_bit_for_bit():
    a, loss_a, grads_a = capsnet_steps(2)
    b, loss_b, grads_b = capsnet_steps(2)
    assert loss_a == loss_b
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name], err_msg=name)
        if name in grads_a:
            np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


def test_the_threaded_gradient_is_the_one_thread_gradient_to_rounding():
    """In float64 the slices' gradients summed agree with the whole batch's to ~1e-12; in float32
    the weights after three Adam steps agree to rounding (what MPI ranks are held to)."""
    for algorithm in ("im2col", "fourier"):  # the replicas share one weight spectrum
        _, loss1, grads1 = capsnet_steps(1, steps=2, dtype="float64", algorithm=algorithm)
        for threads in (2, 3, 5):
            _, loss_t, grads_t = capsnet_steps(threads, steps=2, dtype="float64", algorithm=algorithm)
            assert loss_t == pytest.approx(loss1, rel=1e-12)
            for name, g in grads1.items():
                np.testing.assert_allclose(grads_t[name], g, rtol=1e-8, atol=1e-13,
                                           err_msg=f"{algorithm}, {threads} threads, {name}")
    one, _, _ = capsnet_steps(1)
    two, _, _ = capsnet_steps(2)
    for name, value in one.state_dict().items():
        np.testing.assert_allclose(two.state_dict()[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_shared_weight_spectrum_serves_only_replicated_steps():
    """After a replicated step and an optimizer step, the model used on its own computes the
    spectrum of its new weights, not the replicas' stale one."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 28, 28))
    y = np.arange(6) % 10
    model = CapsNet(CapsNetConfig(**SMALL), dtype="float64", seed=1)
    model.primary.conv.algorithm = "fourier"
    crit, opt = CapsNetLoss(), Adam(model.parameters(), lr=1e-2)
    runner = Replicas(model, 2)
    lengths, recon = runner(x, y)
    crit(lengths, recon, y, x)
    runner.backward(*crit.backward())
    opt.step()
    fresh = CapsNet(CapsNetConfig(**SMALL), dtype="float64", seed=9)
    fresh.load_state_dict(model.state_dict())
    fresh.primary.conv.algorithm = "fourier"
    np.testing.assert_allclose(model(x, y)[0], fresh(x, y)[0], rtol=1e-12)
    assert model.held_nbytes() > 0
    runner.release()
    model.release()
    assert all(m.held_nbytes() == 0 for m in runner.models)


def test_predict_and_eval_forward_join_the_slices_in_order():
    rng = np.random.default_rng(0)
    x = rng.random((7, 1, 28, 28)).astype(np.float64)
    model = CapsNet(CapsNetConfig(**SMALL), dtype="float64", seed=1)
    classes, lengths = model.predict(x)
    runner = Replicas(model, 3)
    r_classes, r_lengths = runner.predict(x)
    np.testing.assert_array_equal(r_classes, classes)
    np.testing.assert_allclose(r_lengths, lengths, rtol=1e-12)
    runner.eval()
    r_len, r_recon = runner(x)
    model.eval()
    m_len, m_recon = model(x)
    np.testing.assert_allclose(r_len, m_len, rtol=1e-12)
    np.testing.assert_allclose(r_recon, m_recon, rtol=1e-12, atol=1e-15)
    assert runner.training is False


def test_a_batch_smaller_than_the_thread_count_uses_fewer_replicas():
    _, loss1, grads1 = capsnet_steps(1, steps=1, batch=2, dtype="float64")
    _, loss4, grads4 = capsnet_steps(4, steps=1, batch=2, dtype="float64")
    assert loss4 == pytest.approx(loss1, rel=1e-13)
    for name, g in grads1.items():
        np.testing.assert_allclose(grads4[name], g, rtol=1e-9, atol=1e-14, err_msg=name)


def test_the_replicas_follow_weights_replaced_in_the_model():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 28, 28)).astype(np.float32)
    model = CapsNet(CapsNetConfig(**SMALL), seed=1)
    runner = Replicas(model, 2)
    runner.predict(x)  # makes the copies
    other = CapsNet(CapsNetConfig(**SMALL), seed=2)
    model.load_state_dict(other.state_dict())
    for p in model.parameters():  # and a rebinding, as Module.astype or a user might do
        p.data = p.data.copy()
    # float32, and a slice of 3 may take another convolution algorithm than the batch of 6
    # (the engine chooses per batch size): rounding differs by ~1e-6; other weights by far more
    np.testing.assert_allclose(runner.predict(x)[1], other.predict(x)[1], rtol=1e-4)


def test_dropout_masks_do_not_depend_on_the_thread_count():
    def grads(threads):
        rng = np.random.default_rng(3)
        x, g = rng.standard_normal((10, 6)), rng.standard_normal((10, 4))
        model = Sequential(Linear(6, 8, dtype="float64", seed=np.random.default_rng(1)), Dropout(0.5, seed=11),
                           Linear(8, 4, dtype="float64", seed=np.random.default_rng(2)))
        runner = model if threads == 1 else Replicas(model, threads)
        outs = []
        for _ in range(2):  # the draw counter moves on the same way
            model.zero_grad()
            outs.append(runner(x))
            runner.backward(g)
        return outs, [p.grad.copy() for p in model.parameters()], model.state_dict()
    outs1, g1, s1 = grads(1)
    outs3, g3, s3 = grads(3)
    for a, b in zip(outs1, outs3):
        np.testing.assert_allclose(b, a, rtol=1e-13)
    for a, b in zip(g1, g3):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(s3["1.state"], s1["1.state"])


def _replicated_and_whole(make, x, g):
    """(outputs, input gradients, state, parameter gradients) of ``make()`` run through two
    replicas and of ``make()`` alone on the whole batch, one training step each."""
    results = []
    for threads in (2, 1):
        model = make()
        runner = Replicas(model, 2) if threads == 2 else model
        y = runner(x)
        gx = runner.backward(g)
        if threads == 2:
            assert len(runner._copies) == 1  # two slices ran
        results.append((y, gx, model.state_dict(), {n: p.grad.copy() for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("shape", [(8, 5), (8, 5, 3), (8, 5, 3, 2)], ids=["1d", "1d-length", "2d-nchw"])
def test_replicas_batch_norm_normalises_the_whole_batch(shape):
    """The replicas of a batch norm exchange their per-image sums (BatchGroup): outputs,
    running statistics and gradients are the whole batch's, as PyTorch's SyncBatchNorm."""
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    kind = BatchNorm2d if len(shape) == 4 else BatchNorm1d
    weight = rng.uniform(0.5, 2, 5)

    def make():
        layer = kind(5, dtype="float64")
        layer.weight.data[...] = weight
        return Sequential(layer)
    (y2, gx2, s2, p2), (y1, gx1, s1, p1) = _replicated_and_whole(make, x, g)
    np.testing.assert_allclose(y2, y1, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(gx2, gx1, rtol=1e-12, atol=1e-14)
    for name, value in s1.items():
        np.testing.assert_allclose(s2[name], value, rtol=1e-13, err_msg=name)
    for name, value in p1.items():
        np.testing.assert_allclose(p2[name], value, rtol=1e-12, err_msg=name)


def test_replicas_batch_norm_on_channels_last_rows_is_the_whole_batch_bit_for_bit():
    """On the convolutions' channels-last output the per-image sums are gathered in batch
    order and summed as one replica sums them: the same bits, float32."""
    rng = np.random.default_rng(5)
    x = np.ascontiguousarray((rng.standard_normal((6, 5, 4, 3)) * 3 + 1).astype(np.float32)).transpose(0, 3, 1, 2)
    g = np.ascontiguousarray(rng.standard_normal((6, 5, 4, 3)).astype(np.float32)).transpose(0, 3, 1, 2)
    (y2, gx2, s2, p2), (y1, gx1, s1, p1) = _replicated_and_whole(lambda: Sequential(BatchNorm2d(3)), x, g)
    np.testing.assert_array_equal(y2, y1)
    np.testing.assert_array_equal(gx2, gx1)
    for name, value in {**s1, **p1}.items():
        np.testing.assert_array_equal({**s2, **p2}[name], value, err_msg=name)


def test_a_failing_replica_does_not_leave_the_others_waiting_in_the_batch_norm():
    model = Sequential(FailsOnMarkedRows(), BatchNorm1d(5, dtype="float64"))
    runner = Replicas(model, 2)
    x = np.random.default_rng(6).standard_normal((8, 5))
    bad = x.copy()
    bad[4, 0] = 999  # the second slice's first row: replica 1 fails, replica 0 waits in gather
    with pytest.raises(ValueError, match="marked row"):
        runner(bad)
    y = runner(x)  # the next step works: the group is opened afresh
    runner.backward(np.ones_like(y))
    expected = Sequential(BatchNorm1d(5, dtype="float64"))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-14)


def test_a_copy_of_a_replicated_model_normalises_on_its_own():
    import copy

    model = Sequential(BatchNorm1d(5, dtype="float64"))
    Replicas(model, 2)(np.random.default_rng(7).standard_normal((8, 5)))
    clone = copy.deepcopy(model)
    assert model[0]._group is not None and clone[0]._group is None
    x = np.random.default_rng(8).standard_normal((4, 5))
    y = clone(x)
    clone.backward(np.ones_like(y))


def test_outputs_without_the_batch_first_are_refused_with_the_fix():
    model = Sequential(Mask(targets=2), Linear(4 * 3, 2, dtype="float64", seed=np.random.default_rng(0)))
    v = np.random.default_rng(0).random((4, 4, 3))
    with pytest.raises(ValueError, match="OMP_NUM_THREADS=1"):
        Replicas(model, 2).forward(v)


def test_a_backward_without_a_training_forward_is_refused():
    runner = Replicas(conv_net(dtype="float64"), 2)
    with pytest.raises(RuntimeError, match="without a training forward"):
        runner.backward(np.ones((4, 10)))
    runner.eval()
    runner(np.zeros((4, 1, 28, 28)))
    with pytest.raises(RuntimeError, match="without a training forward"):
        runner.backward(np.ones((4, 10)))


def test_replicate_gives_the_model_back_with_one_thread_or_off_numpy(emulated_cupy):
    with backend.use("numpy"):
        host_model = conv_net()
    assert replicate(host_model, 1) is host_model
    assert isinstance(replicate(host_model, 2), Replicas)
    with parallel.threads(1):
        assert replicate(host_model) is host_model
    device_model = conv_net().to("cupy")
    assert replicate(device_model, 4) is device_model
    assert "NumPy" in split_reason(device_model, 4)
    with pytest.raises(ValueError, match="not on the NumPy backend"):
        Replicas(device_model, 2)


def test_thread_count_follows_the_scope_the_environment_and_mpi(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert parallel.host_threads() == 16
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    assert parallel.host_threads() == 4  # each of 4 ranks on the node gets its share
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallel.host_threads() == 3  # an explicit count wins
    with parallel.threads(5):
        assert parallel.host_threads() == 5
        with parallel.threads(None):
            assert parallel.host_threads() == 3
        assert parallel.host_threads() == 5
    assert parallel.host_threads() == 3
    with pytest.raises(ValueError, match="positive integer"):
        with parallel.threads(0):
            pass


def test_blas_limit_sets_and_restores_the_library_count():
    before = parallel.blas_threads()
    with parallel.blas_limit(1) as controlled:
        assert controlled
        assert parallel.blas_threads() == 1
    assert parallel.blas_threads() == before


def test_run_shards_splits_in_order_on_the_pool_and_not_inside_a_task():
    seen = []

    def work(lo, hi):
        seen.append((lo, hi, parallel.blas_threads(), parallel.in_pool_task()))
        return hi - lo

    with parallel.threads(3):
        assert parallel.run_shards(7, work) == [3, 2, 2]
    assert sorted(s[:2] for s in seen) == [(0, 3), (3, 5), (5, 7)]
    assert all(s[2] == 1 and s[3] for s in seen)  # BLAS at one thread, each share a pool task
    seen.clear()
    with parallel.threads(1):
        assert parallel.run_shards(7, work) == [7]
    with parallel.threads(3):
        assert parallel.run_shards(1, work) == [1]
    assert [s[:2] for s in seen] == [(0, 7), (0, 1)]
    nested = []
    with parallel.threads(2):
        parallel.run_all([lambda: nested.append(parallel.run_shards(6, lambda lo, hi: (lo, hi)))] * 2)
    assert nested == [[(0, 6)], [(0, 6)]]  # inside a replica's task: one share, in order


@pytest.mark.parametrize("memory", ["channels-last view", "channels-first"])
def test_a_first_layer_split_over_threads_is_the_one_thread_layer_to_rounding(memory):
    """The taps layout's shares of the images (run_shards), with the output gradient as a
    network passes it (a channels-last view) and as a user's NCHW array: the outputs bit for bit
    (each image is its own rows), the weight and bias gradients to rounding (shares added in
    order)."""
    from capsnet.layers import Conv2d  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1, 12, 12)).astype(np.float32)
    gy = rng.standard_normal((7, 8, 8, 8)).astype(np.float32)
    given = gy if memory == "channels-first" else np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert given.flags.c_contiguous == (memory == "channels-first")
    results = {}
    for n in (1, 3):
        layer = Conv2d(1, 8, 5, input_grad=False, seed=0)
        with parallel.threads(n):
            y = layer.forward(x)
            layer.backward(given)
        results[n] = (y, layer.weight.grad.copy(), layer.bias.grad.copy())
    np.testing.assert_array_equal(results[1][0], results[3][0])
    for k in (1, 2):  # sums of about 1,000 float32 terms: the scale of the largest, not each
        np.testing.assert_allclose(results[1][k], results[3][k], rtol=0, atol=1e-5 * np.abs(results[1][k]).max())


def capsnet_trainer(mnist_slice, run_dir, on_step=None, replicas=None):
    x, y, tx, ty = mnist_slice
    model = CapsNet(CapsNetConfig(**SMALL), seed=0)
    optimizer = Adam(model.parameters(), lr=1e-3)
    train = ArrayDataset(x[:120], y[:120], augment=lambda images, rng: random_shift(images, 2, rng))
    return Trainer(model, CapsNetTask(), optimizer, train, run_dir, epochs=2, batch_size=25,
                   eval_data=ArrayDataset(tx[:50], ty[:50]), seed=3, log_every=2, progress=False, log=False,
                   on_step=on_step, replicas=replicas)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_threaded_run_resumes_bit_for_bit_and_stays_near_the_one_thread_run(mnist_slice, tmp_path,  # noqa: F811
                                                                              threads):
    with parallel.threads(threads):
        straight = capsnet_trainer(mnist_slice, tmp_path / "straight")
        history = straight.fit()

        def interrupt(trainer, epoch, step):
            if (epoch, step) == (0, 2):
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            capsnet_trainer(mnist_slice, tmp_path / "resumed", on_step=interrupt).fit()
        resumed = capsnet_trainer(mnist_slice, tmp_path / "resumed")
        resumed.fit(resume=True)
    assert history[-1]["host_threads"] == threads
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], value, err_msg=name)
    with parallel.threads(1):
        single = capsnet_trainer(mnist_slice, tmp_path / "single")
        single_history = single.fit()
    assert single_history[-1]["host_threads"] == 1
    for name, value in single.model.state_dict().items():
        np.testing.assert_allclose(straight.model.state_dict()[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
    assert history[-1]["test_loss"] == pytest.approx(single_history[-1]["test_loss"], rel=1e-3)


def test_nothing_threaded_touches_a_device_model(emulated_cupy, mnist_slice, tmp_path):  # noqa: F811
    """On the (emulated) CuPy backend the loop runs the model itself, whatever the thread count."""
    x, y, _, _ = mnist_slice
    model = conv_net().to("cupy")
    optimizer = Adam(model.parameters(), lr=1e-3)
    from capsnet.layers import MarginLoss

    data = ArrayDataset(emulated_cupy.asarray(x[:40]), emulated_cupy.asarray(y[:40]))
    with parallel.threads(4):
        trainer = Trainer(model, MarginLoss(), optimizer, data, tmp_path / "run", epochs=1, batch_size=20,
                          progress=False, log=False)
        history = trainer.fit()
    assert history[-1]["host_threads"] == 1
    assert trainer.updater.runner is model


def test_a_training_batch_is_split_only_into_slices_of_the_minimum_size(monkeypatch):
    monkeypatch.setattr(slices_module, "MIN_TRAIN_SLICE", 32)
    model = conv_net(dtype="float64")
    runner = Replicas(model, 2)
    model.train()
    x = np.random.default_rng(0).random((32, 1, 28, 28))
    runner(x)
    runner.backward(np.ones((32, 10)))
    assert len(runner.models) == 1  # 32 examples: one replica, BLAS on every core
    runner(np.concatenate([x, x]))
    runner.backward(np.ones((64, 10)))
    assert len(runner.models) == 2  # 64: two slices of 32
    model.eval()
    fresh = Replicas(conv_net(dtype="float64"), 2)
    fresh.eval()
    fresh(x[:8])
    assert len(fresh.models) == 2  # inference splits at any size


def test_efficient_capsnet_splits_batch_32_but_trains_batch_16_whole():
    """EfficientCapsNet.min_train_slice = 16: a batch of 32 trains as two replicas, the
    authors' batch of 16 as one (two replicas of 8 were slower)."""
    from capsnet.models import EfficientCapsNet

    model = EfficientCapsNet(dtype="float32", seed=0)
    runner = Replicas(model, 2)
    model.train()
    rng = np.random.default_rng(0)
    for batch, replicas in ((16, 1), (32, 2)):
        x = rng.random((batch, 1, 28, 28)).astype(np.float32)
        labels = rng.integers(0, 10, batch)
        lengths, recon = runner(x, labels)
        assert len(runner._slices) == replicas
        runner.backward(np.ones_like(lengths), np.zeros_like(recon))
    assert len(runner.models) == 2


def test_efficient_capsnet_split_in_two_trains_as_the_whole_batch_to_rounding():
    """Efficient-CapsNet's batch norms see the whole batch when it runs as two replicas: one
    training step split in two gives the whole batch's outputs, gradients and running
    statistics to float64 rounding (each replica normalising its own half would not)."""
    from capsnet.models import EfficientCapsNet

    rng = np.random.default_rng(9)
    x = rng.random((8, 1, 28, 28))
    labels = rng.integers(0, 10, 8)
    results = []
    for split in (True, False):
        model = EfficientCapsNet(dtype="float64", seed=0)
        model.min_train_slice = 1
        runner = Replicas(model, 2) if split else model
        model.train()
        lengths, recon = runner(x, labels)
        runner.backward(np.ones_like(lengths), recon - x)
        if split:
            assert len(runner.models) == 2  # the batch ran as two replicas
        results.append((lengths, recon, {n: p.grad.copy() for n, p in model.named_parameters()},
                        model.state_dict()))
    (l2, r2, g2, s2), (l1, r1, g1, s1) = results
    np.testing.assert_allclose(l2, l1, rtol=1e-10)
    np.testing.assert_allclose(r2, r1, rtol=1e-10, atol=1e-12)
    for name, value in g1.items():
        np.testing.assert_allclose(g2[name], value, rtol=1e-7, atol=1e-12, err_msg=name)
    for name, value in s1.items():
        np.testing.assert_allclose(s2[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
