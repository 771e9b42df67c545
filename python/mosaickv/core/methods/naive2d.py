"""Naive 2-D compression: ThinK's channel mask plus Quest's block selection, composed as is."""

from typing import Any, ClassVar

from mosaickv.core.methods.think import ThinKMethod


class Naive2DMethod(ThinKMethod):
    """ThinK (arXiv 2407.21018) + Quest (arXiv 2406.10774): one channel mask per KV head for storage,
    min/max bounds over the kept key channels for block selection. The MosaicKV paper's naive
    baseline."""

    name: ClassVar[str] = "naive2d"

    def __init__(self, **params: Any) -> None:
        params.setdefault("token_ratio", 0.10)
        params.setdefault("summary", "minmax")
        super().__init__(**params)
