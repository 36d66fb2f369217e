"""capsnet.training.extensions and strategy: research code extends the loop without
subclassing it; one process is the single-process strategy."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet.data import ArrayDataset, load_mnist, random_shift, to_float
from capsnet.layers import MarginLoss
from capsnet.optim import Adam
from capsnet.training import Extension, SingleProcess, Trainer, strategy_for

from tests.helpers import conv_net


@pytest.fixture(scope="module")
def data(mnist_dir):
    d = load_mnist(mnist_dir, download=False, progress=False)
    x, y = to_float(d.train_images[:200]), d.train_labels[:200]
    return (ArrayDataset(x, y, augment=lambda images, rng: random_shift(images, 2, rng)),
            ArrayDataset(to_float(d.test_images[:100]), d.test_labels[:100]))


def trainer(data, run_dir, *, epochs=3, optimizer=None, **kw):
    model = conv_net()
    optimizer = optimizer(model) if optimizer is not None else Adam(model.parameters(), lr=3e-3)
    train, test = data
    return Trainer(model, MarginLoss(), optimizer, train, run_dir, epochs=epochs, batch_size=50, eval_data=test,
                   seed=3, log_every=3, progress=False, log=False, **kw)


# -- extensions, without subclassing ------------------------------------------------
class StepCounter(Extension):
    """Counts steps, through resumes (its count is in the checkpoint), and writes a file
    each epoch (what a custom figure per epoch would do)."""

    writer_only = True

    def __init__(self):
        self.steps = 0
        self.events = []

    def start(self, trainer):
        self.events.append(("start", trainer.epoch, trainer.step_in_epoch))

    def step(self, trainer):
        self.steps += 1

    def epoch_end(self, trainer, record):
        record_file = trainer.run_dir / f"figure-{record['epoch']}.txt"
        record_file.write_text(f"{record['test_accuracy']:.4f}\n")

    def state_dict(self):
        return {"counted_steps": self.steps}

    def load_state_dict(self, header):
        self.steps = header.get("counted_steps", 0)


def test_an_extension_keeps_its_state_through_a_resume_and_runs_on_every_epoch(data, tmp_path):
    def stop(trainer, epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    first = StepCounter()
    with pytest.raises(KeyboardInterrupt):
        trainer(data, tmp_path / "run", extensions=[first], on_step=stop).fit()
    assert first.steps == 4 + 2
    second = StepCounter()
    trainer(data, tmp_path / "run", extensions=[second]).fit(resume=True)
    assert second.events == [("start", 1, 2)] and second.steps == 3 * 4
    assert sorted(p.name for p in (tmp_path / "run").glob("figure-*.txt")) == [f"figure-{e}.txt" for e in (1, 2, 3)]


def test_extend_refuses_what_is_not_an_extension(data, tmp_path):
    with pytest.raises(TypeError, match="needs a capsnet.training.Extension, got function"):
        trainer(data, tmp_path / "run").extend(lambda trainer: None)


def test_one_process_is_the_single_process_strategy_whose_hooks_change_nothing():
    strategy = strategy_for(None)
    assert isinstance(strategy, SingleProcess) and strategy.writes and strategy.size == 1
    batch = (np.arange(6), np.arange(6))
    rows, _ = strategy.local(batch)
    assert rows is batch and strategy.shard(7) == (0, 7) and strategy.gather(3) == [3]
    assert strategy.reduce_gradients(1.0, True) is True and strategy.agree(False) is False
    assert strategy.on_writer(lambda: 42) == 42
