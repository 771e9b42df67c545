"""Method registry: ``make_method(name, **params)`` for full, quest, think, naive2d, mosaic."""

from mosaickv.core.base import CompressionMethod
from mosaickv.core.methods.full import FullMethod
from mosaickv.core.methods.mosaic import MosaicMethod
from mosaickv.core.methods.naive2d import Naive2DMethod
from mosaickv.core.methods.quest import QuestMethod
from mosaickv.core.methods.think import ThinKMethod

METHODS: dict[str, type[CompressionMethod]] = {
    cls.name: cls for cls in (FullMethod, QuestMethod, ThinKMethod, Naive2DMethod, MosaicMethod)
}


def make_method(name: str, **params: object) -> CompressionMethod:
    """Build a method by name with its keyword parameters (see each class for what it accepts)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    try:
        return METHODS[name](**params)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"bad parameters for method {name!r}: {err}") from err


__all__ = [
    "METHODS", "FullMethod", "MosaicMethod", "Naive2DMethod", "QuestMethod", "ThinKMethod", "make_method",
]
