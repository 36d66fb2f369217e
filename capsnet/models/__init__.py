"""Models built from capsnet.layers: the paper's CapsNet and its baseline CNN."""
from capsnet.models.baseline import BaselineCNN, BaselineCNNConfig
from capsnet.models.capsnet import CapsNet, CapsNetConfig, CapsNetLoss, flops_per_image, n_parameters

__all__ = ["BaselineCNN", "BaselineCNNConfig", "CapsNet", "CapsNetConfig", "CapsNetLoss", "flops_per_image",
           "n_parameters"]
