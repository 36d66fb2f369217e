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
# # Look inside a CapsNet
#
# Train a small CapsNet on the MNIST sample installed with the package, then look at what
# the paper shows: the **reconstructions** the decoder draws from the longest capsule, what
# each **dimension** of that capsule encodes, and the **routing coefficients** that connect
# the primary capsules to the digit capsules.

# %%
import matplotlib.pyplot as plt
import numpy as np

from capsnet.data import load_mnist_sample, to_float
from capsnet.models import CapsNetConfig, n_parameters
from capsnet.training import RunTrainer, TrainConfig

# the paper's network, narrower: 64 convolution channels and 8 primary capsule types
model_config = {**CapsNetConfig().as_dict(), "conv_channels": 64, "primary_types": 8}
config = TrainConfig(dataset="mnist-sample", epochs=2, train_limit=3000, test_limit=500, model=model_config)
trainer = RunTrainer(config, "runs/look-inside", progress=False)
print(f"{n_parameters(trainer.model):,} parameters")
history = trainer.fit()
model = trainer.model
print(f"test accuracy on 500 sample images: {history[-1]['test_accuracy']:.3f}")

# %% [markdown]
# ## Reconstructions
#
# In evaluation the decoder sees only the longest digit capsule (the others are masked to
# zero) and draws the digit from its 16 numbers.

# %%
x = to_float(load_mnist_sample().test_images[:8])            # (8, 1, 28, 28)
recon = model.reconstruct(x)                                   # from the longest capsule
predicted, lengths = model.predict(x)

fig, axes = plt.subplots(2, 8, figsize=(8, 2.3))
for i in range(8):
    axes[0, i].imshow(x[i, 0], cmap="gray")
    axes[1, i].imshow(recon[i, 0], cmap="gray")
    axes[1, i].set_title(f"{int(predicted[i])}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("inputs (top), reconstructions from the longest capsule (bottom)", fontsize=9)
plt.show()

# %% [markdown]
# ## What a capsule dimension encodes
#
# Take the predicted capsule of one image, move one of its 16 dimensions at a time from
# -0.25 to 0.25 and decode (figure 4 of the paper). Rows where the digit changes (its
# thickness, slant, width) are dimensions the network has given a meaning.

# %%
image = x[:1]
k = int(predicted[0])
v = model.capsules(image)                                      # (1, 10, 16)
steps = np.arange(-0.25, 0.2501, 0.05)
mask = np.zeros_like(v)
mask[:, k] = 1
rows = []
for d in range(v.shape[2]):
    moved = np.repeat(v * mask, len(steps), axis=0)             # every other capsule masked
    moved[:, k, d] += steps
    rows.append(model.decode(moved)[:, 0])                      # (steps, 28, 28)

fig, axes = plt.subplots(len(rows), len(steps), figsize=(len(steps) * 0.55, len(rows) * 0.55))
for d, row in enumerate(rows):
    for s, img in enumerate(row):
        axes[d, s].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[d, s].axis("off")
fig.suptitle(f"each row: one dimension of the class-{k} capsule, from -0.25 to 0.25", fontsize=9)
plt.show()

# %% [markdown]
# ## Routing coefficients
#
# `model.routing(x)` returns the digit capsules and the coupling coefficients \(c_{ij}\)
# of the last routing iteration, `(B, n_primary, 10)`: how much each primary capsule sends
# to each digit capsule. Averaged over the capsule types at each position of the 6x6
# primary grid, they show where in the image each digit capsule takes its input from;
# at each position they sum to 1 over the classes, so uniform routing is 0.1.

# %%
_, c = model.routing(image)                                    # (1, 8 * 6 * 6, 10)
cfg = model.config
_, (oh, ow) = cfg.feature_sizes
maps = c[0].reshape(cfg.primary_types, oh, ow, cfg.n_classes).mean(axis=0)   # (6, 6, 10)
print("coefficients sum to 1 over the classes:", np.allclose(c.sum(axis=2), 1))

fig, axes = plt.subplots(1, 11, figsize=(11, 1.4))
axes[0].imshow(image[0, 0], cmap="gray")
axes[0].set_title("input", fontsize=8)
for j in range(10):
    axes[j + 1].imshow(maps[:, :, j] - 1 / cfg.n_classes, cmap="RdBu_r", vmin=-0.1, vmax=0.1)
    axes[j + 1].set_title(f"class {j}" + (" *" if j == k else ""), fontsize=8)
for ax in axes:
    ax.axis("off")
fig.suptitle("coupling coefficients minus uniform (red: more than 1/10), per class", fontsize=9)
plt.show()
