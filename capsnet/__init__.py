"""capsnet: Capsule Networks from scratch on NumPy and CuPy."""
__version__ = "0.3.0"  # the one place the version is set (pyproject.toml reads it)
