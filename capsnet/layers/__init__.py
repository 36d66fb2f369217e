"""Layers: a Module class for each, and beside it the pure forward/backward functions.

The submodules are ``base`` (Parameter, Buffer, Module, Sequential), ``dense`` (Linear,
Flatten, Reshape), ``activation`` (ReLU, Sigmoid), ``conv`` (Conv2d, ConvTranspose2d,
im2col), ``fourier`` (the Fourier-domain convolution), ``pool`` (MaxPool2d), ``norm``
(BatchNorm1d, BatchNorm2d), ``stochastic`` (Dropout), ``capsule`` (squash, PrimaryCaps,
DigitCaps, routing) and ``loss`` (margin, reconstruction, cross-entropy). No name below is
also the name of a submodule, so ``import capsnet.layers.dense`` and
``from capsnet.layers import linear`` each give what they say.
"""
from capsnet.layers.activation import ReLU, Sigmoid, relu, relu_backward, sigmoid, sigmoid_backward
from capsnet.layers.base import Buffer, Module, Parameter, Sequential
from capsnet.layers.capsule import (
    CapsuleLength,
    DigitCaps,
    Mask,
    PrimaryCaps,
    RoutingState,
    Squash,
    capsule_length,
    capsule_length_backward,
    capsule_predictions,
    capsule_predictions_backward,
    dynamic_routing,
    dynamic_routing_backward,
    softmax,
    squash,
    squash_backward,
)
from capsnet.layers.conv import (
    Conv2d,
    ConvTranspose2d,
    col2im,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    im2col,
)
from capsnet.layers.dense import Flatten, Linear, Reshape, linear, linear_backward
from capsnet.layers.loss import (
    CrossEntropyLoss,
    MarginLoss,
    ReconstructionLoss,
    cross_entropy,
    cross_entropy_backward,
    margin_loss,
    margin_loss_backward,
    reconstruction_loss,
    reconstruction_loss_backward,
)
from capsnet.layers.norm import BatchNorm1d, BatchNorm2d, batch_norm, batch_norm_backward
from capsnet.layers.pool import MaxPool2d, max_pool2d, max_pool2d_backward
from capsnet.layers.stochastic import Dropout, dropout, dropout_backward

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Buffer",
    "CapsuleLength",
    "Conv2d",
    "ConvTranspose2d",
    "CrossEntropyLoss",
    "DigitCaps",
    "Dropout",
    "Flatten",
    "Linear",
    "MarginLoss",
    "Mask",
    "MaxPool2d",
    "Module",
    "Parameter",
    "PrimaryCaps",
    "ReLU",
    "ReconstructionLoss",
    "Reshape",
    "RoutingState",
    "Sequential",
    "Sigmoid",
    "Squash",
    "batch_norm",
    "batch_norm_backward",
    "capsule_length",
    "capsule_length_backward",
    "capsule_predictions",
    "capsule_predictions_backward",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "dropout",
    "dropout_backward",
    "dynamic_routing",
    "dynamic_routing_backward",
    "im2col",
    "linear",
    "linear_backward",
    "margin_loss",
    "margin_loss_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "reconstruction_loss",
    "reconstruction_loss_backward",
    "relu",
    "relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "squash",
    "squash_backward",
]
