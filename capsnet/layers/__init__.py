"""Layers: a Module class for each, and beside it the pure forward/backward functions."""
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
from capsnet.layers.linear import (
    Linear,
    ReLU,
    Sigmoid,
    linear,
    linear_backward,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
)
from capsnet.layers.loss import (
    MarginLoss,
    ReconstructionLoss,
    margin_loss,
    margin_loss_backward,
    reconstruction_loss,
    reconstruction_loss_backward,
)

__all__ = [name for name in dir() if not name.startswith("_")]
