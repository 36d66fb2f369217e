"""Models built from capsnet.layers: the paper's CapsNet and its baseline CNN, Efficient-CapsNet
(self-attention routing) and the matrix-capsule network (EM routing)."""
from capsnet.models.baseline import BaselineCNN, BaselineCNNConfig
from capsnet.models.capsnet import CapsNet, CapsNetConfig, CapsNetLoss, CapsNetTask, flops_per_image, n_parameters
from capsnet.models.efficient_capsnet import EfficientCapsNet, EfficientCapsNetConfig
from capsnet.models.matrix_capsnet import MatrixCapsNet, MatrixCapsNetConfig, SpreadTask

__all__ = ["BaselineCNN", "BaselineCNNConfig", "CapsNet", "CapsNetConfig", "CapsNetLoss", "CapsNetTask", "EfficientCapsNet",
           "EfficientCapsNetConfig", "MatrixCapsNet", "MatrixCapsNetConfig", "SpreadTask", "flops_per_image",
           "n_parameters"]
