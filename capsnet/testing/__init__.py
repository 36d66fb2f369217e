"""Testing tools for research code: an emulated CuPy device that counts what a GPU would do.

``CAPSNET_EMULATE_CUPY=1`` makes the ``cupy`` backend this emulated device
(:mod:`capsnet.testing.emulation`); :func:`device_counts` counts its kernel
launches, transfers and synchronisations inside a ``with`` block. The gradient
checker is :mod:`capsnet.gradcheck`.
"""
from capsnet.testing.emulation import DeviceCounts, Event, device_counts

__all__ = ["DeviceCounts", "Event", "device_counts"]
