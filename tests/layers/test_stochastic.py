"""capsnet.layers.stochastic: Dropout is inverted, seeded and the identity in eval mode,
its gradient check, PyTorch parity given the same mask, and the masks of batch slices."""
from __future__ import annotations

import numpy as np

from capsnet.gradcheck import check_module
from capsnet.layers import Dropout, Module

from tests.helpers import dev, host, rel_error


def test_gradcheck_dropout(xp, host_rng):
    class Replay(Module):
        """Dropout drawing the same mask every call, so the function is fixed."""

        def __init__(self):
            super().__init__()
            self.drop = Dropout(0.3, seed=5)

        def forward(self, x):
            self.drop.state.data[1] = 0
            return self.drop(x)

        def backward(self, g):
            return self.drop.backward(g)

    check_module(Replay(), dev(host_rng.standard_normal((3, 4, 5))))


# -- behaviour -------------------------------------------------------------------------------
def test_dropout_is_inverted_seeded_and_the_identity_in_eval(xp):
    x = dev(np.ones((200, 50)))
    a, b = Dropout(0.25, seed=3), Dropout(0.25, seed=3)
    ya = host(a(x))
    assert set(np.unique(ya)) == {0.0, 1 / 0.75}
    assert abs((ya == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(ya, host(b(x)))  # same seed, same masks
    assert not np.array_equal(ya, host(a(x)))  # the next draw differs
    a.eval()
    assert a(x) is x
    state = a.state_dict()
    c = Dropout(0.25, seed=99)
    c.load_state_dict(state)  # the seed and the draw count travel in state_dict
    b(x)
    np.testing.assert_array_equal(host(c.train()(x)), host(b(x)))


def test_dropout_parity_with_pytorch_given_the_same_mask(torch, host_rng):
    layer = Dropout(0.4, seed=1)
    x = host_rng.standard_normal((6, 5))
    y = layer(x)
    mask = layer._cache[0]  # the mask this forward drew
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(mask)  # inverted dropout with that mask: torch's formula
    assert rel_error(y, yt.detach().numpy()) < 1e-15
    g = host_rng.standard_normal(x.shape)
    yt.backward(torch.tensor(g))
    assert rel_error(layer.backward(g), xt.grad.numpy()) < 1e-15
    kept = mask[mask > 0]
    assert np.allclose(kept, 1 / 0.6)


def test_dropout_masks_of_slices_are_rows_of_the_whole_batch_mask(xp, host_rng):
    from capsnet.layers import Dropout
    from capsnet.layers.stochastic import batch_slice

    x = dev(np.ones((7, 5)))
    whole = host(Dropout(0.5, seed=4)(x))
    parts = []
    for lo, hi in ((0, 4), (4, 7)):
        layer = Dropout(0.5, seed=4)
        with batch_slice(7, lo, hi):
            parts.append(host(layer(x[lo:hi])))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
