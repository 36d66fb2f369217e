"""Bad inputs to ConvTranspose2d, MaxPool2d, BatchNorm, Dropout, CrossEntropyLoss and
Reshape are refused with messages that say what was expected."""
from __future__ import annotations

import numpy as np
import pytest

from capsnet import checks
from capsnet.layers import BatchNorm1d, BatchNorm2d, ConvTranspose2d, CrossEntropyLoss, Dropout, MaxPool2d
from capsnet.models import BaselineCNN, BaselineCNNConfig, CapsNetConfig

from tests.helpers import dev


F64 = "float64"


def test_bad_inputs_are_refused_with_clear_errors(xp, host_rng):
    with pytest.raises(ValueError, match="output_padding must be smaller than the stride"):
        ConvTranspose2d(2, 2, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"ConvTranspose2d expected input of shape \(batch, 2, any, any\)"):
        ConvTranspose2d(2, 2, 3, dtype=F64)(dev(np.zeros((1, 3, 4, 4))))
    with pytest.raises(ValueError, match="MaxPool2d expected input of shape"):
        MaxPool2d(2)(dev(np.zeros((4, 4))))
    with pytest.raises(ValueError, match="padding must be at most half the kernel"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="BatchNorm1d expected input of shape"):
        BatchNorm1d(3, dtype=F64)(dev(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="BatchNorm2d expected input of shape"):
        BatchNorm2d(3, dtype=F64)(dev(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm1d(3, dtype=F64)(dev(np.zeros((1, 3))))
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        CrossEntropyLoss()(dev(np.zeros((2, 5))), dev(np.array([1, 5])))
        checks.raise_pending()  # on CuPy the count of bad labels waits on the device until a flush
    with pytest.raises(ValueError, match=r"labels of shape \(2,\)"):
        CrossEntropyLoss()(dev(np.zeros((2, 5))), dev(np.array([1])))
    with pytest.raises(ValueError, match="Dropout p must be in"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="BaselineCNN expected input of shape"):
        BaselineCNN(BaselineCNNConfig(channels=(2,), fc=(3,)))(dev(np.zeros((1, 1, 20, 20), np.float32)))
    with pytest.raises(ValueError, match="deconv decoder needs an input height and width divisible by 4"):
        CapsNetConfig(input_shape=(1, 30, 30), decoder="deconv")
