"""Models built from capsnet.layers."""
from capsnet.models.capsnet import CapsNet, CapsNetConfig, CapsNetLoss, flops_per_image, n_parameters

__all__ = ["CapsNet", "CapsNetConfig", "CapsNetLoss", "flops_per_image", "n_parameters"]
