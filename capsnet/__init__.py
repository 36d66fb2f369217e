"""capsnet: Capsule Networks from scratch on NumPy and CuPy."""
__version__ = "0.5.6"  # the one place the version is set (pyproject.toml reads it)

import os as _os

from capsnet import allocator as _allocator

_allocator._apply_default()  # freed arrays reused by the next step, not remapped (CAPSNET_MALLOC=system: off)

if _os.environ.get("CAPSNET_EMULATE_CUPY") == "1":  # the emulated device registers itself with capsnet.backend
    from capsnet.testing import emulation as _emulation  # noqa: E402, F401
