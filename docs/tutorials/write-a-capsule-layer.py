# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Write your own capsule layer
#
# A capsnet layer is two pieces: a pure **function pair** (the forward math and its
# gradient) and a thin **`Module`** that owns the parameters and the cache. This tutorial
# writes one, proves its backward pass with a float64 gradient check, and trains a model
# that uses it with `Trainer` on the MNIST sample installed with the package (no download).
#
# The layer: a **capsule transform**. Each of the `I` input capsules gets its own matrix
# \(A_i\) and the result is squashed again,
#
# \[ v_i = \operatorname{squash}(A_i u_i), \qquad u: (B, I, D_{in}),\; A: (I, D_{out}, D_{in}),\; v: (B, I, D_{out}). \]
#
# It lets each primary capsule re-describe its pose before routing.

# %%
import numpy as np

from capsnet import backend
from capsnet.layers import squash, squash_backward


def capsule_transform(u, a):
    """v_i = squash(A_i u_i). u: (B, I, Din), a: (I, Dout, Din) -> (v (B, I, Dout), s)."""
    xp = backend.get_array_module(u, a)               # numpy or cupy, from the arrays
    s = xp.einsum("bid,iod->bio", u, a)
    return squash(s), s


def capsule_transform_backward(grad_v, u, a, s):
    """Gradients (u, a) of capsule_transform, given dL/dv (B, I, Dout) and the cached s."""
    xp = backend.get_array_module(u)
    grad_s = squash_backward(grad_v, s)               # back through the squash
    grad_u = xp.einsum("bio,iod->bid", grad_s, a)     # dL/du_i = A_i^T dL/ds_i
    grad_a = xp.einsum("bio,bid->iod", grad_s, u)     # dL/dA_i = sum_b dL/ds_i u_i^T
    return grad_u, grad_a


# %% [markdown]
# The `Module` follows the contract every capsnet layer keeps: `forward` caches what
# `backward` needs, in training mode only (`self._save`); `backward` takes the cache
# (`self._pop`, which refuses a backward without a forward), **adds** the parameter
# gradient into `param.grad` and returns the input gradient. Weights are drawn on the
# host with a seeded generator, so every backend starts from the same ones.

# %%
from capsnet.layers import Module
from capsnet.layers.base import init_param


class CapsuleTransform(Module):
    """v_i = squash(A_i u_i): (B, n_caps, in_dim) -> (B, n_caps, out_dim)."""

    def __init__(self, n_caps, in_dim, out_dim, *, dtype="float32", seed=None):
        super().__init__()
        self.n_caps, self.in_dim, self.out_dim = n_caps, in_dim, out_dim
        self.weight = init_param((n_caps, out_dim, in_dim), 1 / np.sqrt(in_dim), dtype, seed)

    def forward(self, u):
        if u.ndim != 3 or u.shape[1:] != (self.n_caps, self.in_dim):
            raise ValueError(f"CapsuleTransform expected input of shape (batch, {self.n_caps}, {self.in_dim}), "
                             f"got {tuple(u.shape)}")
        v, s = capsule_transform(u, self.weight.data)
        self._save(u, s)
        return v

    def backward(self, grad_out):
        u, s = self._pop()
        grad_u, grad_a = capsule_transform_backward(grad_out, u, self.weight.data, s)
        self.weight.grad += grad_a
        return grad_u


layer = CapsuleTransform(6, 4, 5, seed=0)
v = layer(np.random.default_rng(1).standard_normal((2, 6, 4)).astype(np.float32))
print(layer.weight, "->", v.shape, v.dtype)

# %% [markdown]
# ## Prove the backward pass
#
# `capsnet.gradcheck.check_module` compares `backward` with central differences in
# float64, for the input and for every parameter. On a failure it raises and prints eps,
# the tolerances, the worst index and both values.

# %%
from capsnet.gradcheck import check_module

u = np.random.default_rng(2).standard_normal((3, 6, 4))       # float64
results = check_module(CapsuleTransform(6, 4, 5, dtype="float64", seed=0), u)
for r in results:
    print(r)

# %% [markdown]
# A wrong gradient does not pass. Here the backward forgets the squash:

# %%
from capsnet.gradcheck import GradcheckError


class Broken(CapsuleTransform):
    def backward(self, grad_out):
        u, s = self._pop()
        self.weight.grad += np.einsum("bio,bid->iod", grad_out, u)
        return np.einsum("bio,iod->bid", grad_out, self.weight.data)


try:
    check_module(Broken(6, 4, 5, dtype="float64", seed=0), u)
    raise AssertionError("the broken backward passed the gradient check")
except GradcheckError as exc:
    print("refused, as it should be:", str(exc).splitlines()[0])

# %% [markdown]
# ## Train a model that uses it
#
# The layer goes between the primary capsules and the routing layer of a small CapsNet.
# `Trainer` needs a model, a loss, an optimizer and a data source; here the first 2,000
# training images of the MNIST sample installed with capsnet, and 500 of its test images.

# %%
from capsnet.data import ArrayDataset, load_mnist_sample, random_shift, to_float
from capsnet.layers import CapsuleLength, Conv2d, DigitCaps, MarginLoss, PrimaryCaps, ReLU, Sequential
from capsnet.optim import Adam
from capsnet.training import Trainer, count_correct

sample = load_mnist_sample()                          # 5,000 + 1,000 images: a sample, not MNIST
train = ArrayDataset(to_float(sample.train_images[:2000]), sample.train_labels[:2000],
                     augment=lambda x, rng: random_shift(x, 2, rng))
test = ArrayDataset(to_float(sample.test_images[:500]), sample.test_labels[:500])

rng = np.random.default_rng(0)
model = Sequential(                                   # (B, 1, 28, 28)
    Conv2d(1, 32, 9, seed=rng), ReLU(),               # -> (B, 32, 20, 20)
    PrimaryCaps(32, n_types=4, dim=8, seed=rng),      # -> (B, 144, 8)
    CapsuleTransform(144, 8, 8, seed=rng),            # -> (B, 144, 8): the new layer
    DigitCaps(144, 8, 10, 16, seed=rng),              # -> (B, 10, 16)
    CapsuleLength())                                  # -> (B, 10)
optimizer = Adam(model.parameters(), lr=3e-3)
trainer = Trainer(model, MarginLoss(), optimizer, train, "runs/capsule-transform", epochs=2, batch_size=50,
                  eval_data=test, metrics={"accuracy": count_correct}, progress=False)
history = trainer.fit()

# %%
accuracy = history[-1]["test_accuracy"]
print(f"test accuracy after {len(history)} epochs on 2,000 sample images: {accuracy:.3f}")
assert accuracy > 0.5, "the model should be far above chance (0.1)"
