"""Layers: a Module class for each, and beside it the pure forward/backward functions.

The submodules are ``base`` (Parameter, Module, Sequential), ``dense`` (Linear, Flatten),
``activation`` (ReLU, Sigmoid), ``conv`` (Conv2d, im2col), ``fourier`` (the
Fourier-domain convolution), ``capsule`` (squash, PrimaryCaps, DigitCaps, routing)
and ``loss``. No name below is also the name of a submodule, so
``import capsnet.layers.dense`` and ``from capsnet.layers import linear`` each give
what they say.
"""
from capsnet.layers.activation import ReLU, Sigmoid, relu, relu_backward, sigmoid, sigmoid_backward
from capsnet.layers.base import Module, Parameter, Sequential
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
from capsnet.layers.conv import Conv2d, col2im, conv2d, conv2d_backward, im2col
from capsnet.layers.dense import Flatten, Linear, linear, linear_backward
from capsnet.layers.loss import (
    MarginLoss,
    ReconstructionLoss,
    margin_loss,
    margin_loss_backward,
    reconstruction_loss,
    reconstruction_loss_backward,
)

__all__ = [
    "CapsuleLength",
    "Conv2d",
    "DigitCaps",
    "Flatten",
    "Linear",
    "MarginLoss",
    "Mask",
    "Module",
    "Parameter",
    "PrimaryCaps",
    "ReLU",
    "ReconstructionLoss",
    "RoutingState",
    "Sequential",
    "Sigmoid",
    "Squash",
    "capsule_length",
    "capsule_length_backward",
    "capsule_predictions",
    "capsule_predictions_backward",
    "col2im",
    "conv2d",
    "conv2d_backward",
    "dynamic_routing",
    "dynamic_routing_backward",
    "im2col",
    "linear",
    "linear_backward",
    "margin_loss",
    "margin_loss_backward",
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
