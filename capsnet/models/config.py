"""The dict round trip that every configuration dataclass shares (model and training
configurations go into JSON checkpoint headers and back)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

__all__ = ["DictConfig"]

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for a dataclass: ``as_dict()`` (tuples as lists, for JSON) and
    ``from_dict(d)`` (lists back to tuples; unknown keys refused with the known ones)."""

    _what = "configuration"  # named in the error for unknown keys

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what} keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
